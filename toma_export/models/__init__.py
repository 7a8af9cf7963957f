"""Model registry: `get(name)` -> the family spec with `.load()` and `.sample_inputs()`.

A name is a registered model (flux, sdxl: real weights; flux-tiny, sdxl-tiny: their config with the trained
weights shipped in models/weights/), a local diffusers folder (a pipeline folder with model_index.json, or
the transformer / unet folder itself),
or a hub id already in the local Hugging Face cache. For folders the family and variant (FLUX dev vs
schnell, SDXL base vs refiner) are read off the config, and the defaults (dtype, text length) off the
folder, so a downloaded model needs no options.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

from ..errors import UsageError
from ..errors import ModelNotAvailable
from ..families import FAMILIES, ModelSpec, read_config, specs
from ..families.controlnet import FOLDER_CLASSES, of_network
from ..families.spec import network_folder
from ..weightfiles import safetensors_header, weight_files

_SPECS = specs()
_SAFETENSORS_DTYPES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}


def names() -> list[str]:
    return list(_SPECS)


def get(name: str) -> ModelSpec:
    """The spec for a registered name, a local diffusers folder or a cached hub id; one clear line otherwise."""
    if name in _SPECS:
        spec = _SPECS[name]
        cached = spec.source and _hub_snapshot(spec.source)
        return from_folder(cached, name=name, hub_id=spec.source) if cached else spec
    path = Path(name).expanduser()
    if path.is_dir():
        return from_folder(path)
    if path.exists():
        raise UsageError(f"{name} is a file; pass the diffusers folder that holds it (the one with config.json)")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        cached = _hub_snapshot(name)
        if cached:
            return from_folder(cached, name=name, hub_id=name)
        raise ModelNotAvailable(f"{name} is not in the local Hugging Face cache ({_hub_cache()}); download it where "
                                f"the hub is reachable (`huggingface-cli download {name}`) or pass its folder")
    raise UsageError(f"unknown model {name!r}: not a registered name ({', '.join(_SPECS)}), an existing local "
                     "diffusers folder, nor a hub id (org/name) in the local cache")


def from_folder(path: Path, name: str | None = None, hub_id: str | None = None) -> ModelSpec:
    """The spec of the network in a diffusers folder: family from the config's class, variant and
    defaults from the config and the weight files, every dimension from the config."""
    path = Path(path)
    for family, module in FAMILIES.items():
        base = _SPECS[family]
        config = read_config(path, base.subfolder)
        if not config or config.get("_class_name") != module.NETWORK_CLASS:
            continue
        folder = network_folder(path, base.subfolder)
        weights_variant, weights_dtype = _weights(folder)
        pipeline = _read_json(path / "model_index.json") if folder != path else {}
        variant, overrides = module.variant(config, pipeline)
        dims = {k: config[k] for k in module.CONFIG_KEYS if k in config}
        return replace(base, name=name or str(path), source=str(path), config={**base.config, **dims},
                       variant=variant, weights_dtype=weights_dtype, weights_variant=weights_variant,
                       hub_id=hub_id, **overrides)
    found = read_config(path, "controlnet")
    if found and found.get("_class_name") in FOLDER_CLASSES:
        return _controlnet(path, found, name, hub_id)
    found = read_config(path, "")
    if found and "_class_name" in found:
        known = " or ".join(m.NETWORK_CLASS for m in FAMILIES.values())
        raise UsageError(f"{path}: its config is a {found['_class_name']}, an architecture toma-export does not "
                         f"support (it patches {known})")
    expected = " or ".join(f"{_SPECS[f].subfolder}/config.json" for f in FAMILIES)
    raise UsageError(f"{path}: no {' or '.join(m.LABEL for m in FAMILIES.values())} config found (expected "
                     f"{expected} in a diffusers folder, or config.json in the network's own folder)")


def _controlnet(path: Path, config: dict, name: str | None, hub_id: str | None) -> ModelSpec:
    """The spec of a ControlNet folder: its family's network sizes, its own config whole (it is the architecture)."""
    family, cls = FOLDER_CLASSES[config["_class_name"]]
    network = _SPECS[family]
    folder = network_folder(path, cls.subfolder)
    weights_variant, weights_dtype = _weights(folder)
    _, overrides = FAMILIES[family].variant(config, {})     # its text length; dev/schnell is the network's own
    arch = {k: v for k, v in config.items() if not k.startswith("_")}
    return of_network(cls, network, name=name or str(path), source=str(path), config=arch, variant="",
                      weights_dtype=weights_dtype, weights_variant=weights_variant, hub_id=hub_id,
                      **overrides)


def _weights(folder: Path) -> tuple[str | None, str]:
    """(diffusers file variant or None, the dtype most tensors are stored in) of a network folder; a folder
    without weight files is refused here, before anything loads."""
    found = weight_files(folder)
    if not found:
        raise ModelNotAvailable(f"{folder}: config.json but no weights (diffusion_pytorch_model*.safetensors or .bin); "
                                "copy the weights beside it, or download the whole folder")
    variant = None if None in found else ("fp16" if "fp16" in found else sorted(found)[0])
    first = next((f for f in found[variant] if f.suffix == ".safetensors"), None)
    if first is None:
        return variant, "fp32"
    counts = Counter(v["dtype"] for v in safetensors_header(first).values())
    return variant, _SAFETENSORS_DTYPES.get(counts.most_common(1)[0][0], "fp32") if counts else "fp32"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a hub id, without touching the network; None when it is not cached."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=_hub_cache()))
    except Exception:            # noqa: BLE001 - not cached, malformed id or offline errors all mean "not here"
        return None


__all__ = ["get", "names", "from_folder", "ModelSpec"]
