"""Model registry: `get(name)` -> the family spec with `.load()` and `.sample_inputs()`.

Names: flux, sdxl (hub id, weights needed), flux-tiny, sdxl-tiny (random init from config), or a path to a
local diffusers folder (pipeline folder, or the transformer / unet folder itself), whose family is read
off its config's class name.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..errors import UsageError
from ..families import FAMILIES, ModelNotAvailable, ModelSpec, read_config, specs

_SPECS = specs()


def names() -> list[str]:
    return list(_SPECS)


def get(name: str) -> ModelSpec:
    """The spec for a registered name or a local diffusers folder; a clear error otherwise."""
    if name in _SPECS:
        return _SPECS[name]
    path = Path(name).expanduser()
    if path.is_dir():
        for family, module in FAMILIES.items():
            base = _SPECS[family]
            config = read_config(path, base.subfolder)
            if config and config.get("_class_name") == module.NETWORK_CLASS:
                dims = {k: config[k] for k in module.CONFIG_KEYS if k in config}
                return replace(base, name=str(path), source=str(path), config={**base.config, **dims})
        expected = " or ".join(f"{_SPECS[f].subfolder}/config.json" for f in FAMILIES)
        raise UsageError(f"{name}: no {' or '.join(m.LABEL for m in FAMILIES.values())} config found "
                         f"(expected {expected} in a diffusers folder)")
    raise UsageError(f"unknown model {name!r}: not a registered name ({', '.join(_SPECS)}) nor an existing "
                     "local diffusers folder")


__all__ = ["get", "names", "ModelSpec", "ModelNotAvailable"]
