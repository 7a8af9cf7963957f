"""Model registry: `get(name)` -> a spec with `.load()` and `.sample_inputs()`.

Names: flux, sdxl (hub id, weights needed), flux-tiny, sdxl-tiny (random init from config), or a path to a
local diffusers folder (pipeline folder, or the transformer / unet folder itself).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from . import flux, sdxl
from ..errors import UsageError
from .spec import ModelNotAvailable, ModelSpec, read_config

_SPECS = {**flux.specs(), **sdxl.specs()}
_FAMILY_BY_CLASS = {"FluxTransformer2DModel": "flux", "UNet2DConditionModel": "sdxl"}


def names() -> list[str]:
    return list(_SPECS)


def get(name: str) -> ModelSpec:
    """The spec for a registered name or a local diffusers folder; a clear error otherwise."""
    if name in _SPECS:
        return _SPECS[name]
    path = Path(name).expanduser()
    if path.is_dir():
        for family in ("flux", "sdxl"):
            base = _SPECS[family]
            config = read_config(path, base.subfolder)
            if config and _FAMILY_BY_CLASS.get(config.get("_class_name")) == family:
                return replace(base, name=str(path), source=str(path), config={**base.config, **_dims(config)})
        raise UsageError(f"{name}: no FLUX transformer or SDXL UNet config found (expected transformer/config.json "
                         "or unet/config.json in a diffusers folder)")
    raise UsageError(f"unknown model {name!r}: not a registered name ({', '.join(_SPECS)}) nor an existing "
                     "local diffusers folder")


def _dims(config: dict) -> dict:
    keys = ("in_channels", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "cross_attention_dim",
            "projection_class_embeddings_input_dim", "addition_time_embed_dim", "down_block_types")
    return {k: config[k] for k in keys if k in config}


__all__ = ["get", "names", "ModelSpec", "ModelNotAvailable"]
