"""The real FLUX.1 and SDXL network configurations (and their ControlNets and FLUX.1-Canny-dev), and random-weight
diffusers folders built from them.

No weights can be downloaded where the tests and the large-model measurements run, so they load folders
written here: the real config.json (depth reducible: FLUX at real width with 1+2, 2+4 ... blocks), random
weights saved by `save_pretrained` in the dtype the hub's files use, in the pipeline layout (model_index.json
plus transformer/ or unet/, whose folder is also a bare model folder). The code under test is then the code
that reads a downloaded model.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
FLUX_SCHNELL = dict(FLUX_DEV, guidance_embeds=False)
SDXL_BASE = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)
SDXL_REFINER = dict(SDXL_BASE, block_out_channels=(384, 768, 1536, 1536), attention_head_dim=(6, 12, 24, 24),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=4, cross_attention_dim=1280,
                    projection_class_embeddings_input_dim=2560)

# SDXL ControlNet canny (diffusers/controlnet-canny-sdxl-1.0): the base UNet's down half and mid block
SDXL_CONTROLNET = {k: v for k, v in SDXL_BASE.items() if k not in ("sample_size", "out_channels", "up_block_types")}
# FLUX.1 ControlNet in the InstantX/Union layout: 5 double and 10 single blocks at FLUX.1's width, 10 modes
FLUX_CONTROLNET_UNION = dict(FLUX_DEV, num_layers=5, num_single_layers=10, num_mode=10)
# FLUX.1-Canny-dev: FLUX.1-dev taking the edge map's packed latents as 64 more input channels
FLUX_CANNY_DEV = dict(FLUX_DEV, in_channels=128, out_channels=64)

# name -> (config, network folder ("": a bare network folder, as the hub keeps ControlNets), pipeline class,
# extra model_index.json entries, hub dtype)
MODELS = {
    "flux-dev": (FLUX_DEV, "transformer", "FluxPipeline", {}, "bf16"),
    "flux-schnell": (FLUX_SCHNELL, "transformer", "FluxPipeline", {}, "bf16"),
    "sdxl-base": (SDXL_BASE, "unet", "StableDiffusionXLPipeline", {"force_zeros_for_empty_prompt": True}, "fp16"),
    "sdxl-refiner": (SDXL_REFINER, "unet", "StableDiffusionXLImg2ImgPipeline", {"requires_aesthetics_score": True},
                     "fp16"),
    "flux-canny-dev": (FLUX_CANNY_DEV, "transformer", "FluxControlPipeline", {}, "bf16"),
    "sdxl-controlnet-canny": (SDXL_CONTROLNET, "", None, {}, "fp16"),
    "flux-controlnet-union": (FLUX_CONTROLNET_UNION, "", None, {}, "bf16"),
}
CLASSES = {"sdxl-controlnet-canny": "ControlNetModel", "flux-controlnet-union": "FluxControlNetModel"}


def config(name: str, blocks: tuple[int, int] | None = None, transformer_depths=None) -> dict:
    """A real configuration, optionally cut: FLUX to (double, single) blocks, SDXL to other transformer
    depths per level; widths, heads and conditioning stay real."""
    if name not in MODELS:
        raise ValueError(f"unknown real configuration {name!r}; choose from {', '.join(MODELS)}")
    cfg = dict(MODELS[name][0])
    if blocks is not None:
        if not name.startswith("flux"):
            raise ValueError("blocks=(double, single) cuts FLUX models; SDXL takes transformer_depths")
        cfg.update(num_layers=blocks[0], num_single_layers=blocks[1])
    if transformer_depths is not None:
        cfg["transformer_layers_per_block"] = transformer_depths
    return cfg


def write(name: str, folder, blocks=None, transformer_depths=None, dtype: str | None = None, seed: int = 0,
          max_shard_size: str = "10GB", file_variant: str | None = None) -> Path:
    """A random-weight diffusers pipeline folder for a real configuration; returns the folder. The network
    is built in `dtype` (the hub's by default), so memory stays at one copy of the weights; `file_variant`
    names the weights as the hub's SDXL does (diffusion_pytorch_model.fp16.safetensors)."""
    from diffusers import __version__

    from ..artifacts import DTYPES

    _, sub, pipeline, extra, hub_dtype = MODELS[name]
    cls = _network_class(name)
    folder = Path(folder)
    with _default_dtype(DTYPES[dtype or hub_dtype]), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**config(name, blocks, transformer_depths))
    model.save_pretrained(folder / sub, max_shard_size=max_shard_size, variant=file_variant)
    if pipeline:
        index = {"_class_name": pipeline, "_diffusers_version": __version__, **extra, sub: ["diffusers", cls.__name__]}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_streamed(name: str, folder, blocks=None, transformer_depths=None, dtype: str | None = None, seed: int = 0,
                   shard_bytes: int = 2 << 30) -> Path:
    """The same pipeline folder as `write`, for models too large to hold in memory (the full FLUX.1-dev is
    24 GB in bf16): the network is built on the meta device and each weight is drawn on its own (normal over
    the square root of its fan-in for matrices and kernels, ones for 1-D scales, zeros for biases) and saved
    in shards of at most `shard_bytes` with the index JSON diffusers writes. These weights are not the
    module's own init: use such a folder to measure time and memory, not parity."""
    from diffusers import __version__
    from safetensors.torch import save_file

    from ..artifacts import DTYPES

    _, sub, pipeline, extra, hub_dtype = MODELS[name]
    cls = _network_class(name)
    with torch.device("meta"):
        model = cls(**config(name, blocks, transformer_depths))
    net = Path(folder) / sub
    net.mkdir(parents=True, exist_ok=not sub)
    model.save_config(net)
    dtype_ = DTYPES[dtype or hub_dtype]
    generator = torch.Generator().manual_seed(seed)
    shards, current, size = [], {}, 0
    for key, meta in model.state_dict().items():
        if current and size + meta.numel() * dtype_.itemsize > shard_bytes:
            shards.append(_save_shard(current, net, len(shards), save_file))
            current, size = {}, 0
        current[key] = _draw(key, meta.shape, dtype_, generator)
        size += meta.numel() * dtype_.itemsize
    shards.append(_save_shard(current, net, len(shards), save_file))
    weight_map, total = {}, 0
    for i, (temporary, keys, nbytes) in enumerate(shards):
        final = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        temporary.rename(net / final)
        weight_map.update(dict.fromkeys(keys, final))
        total += nbytes
    index = dict(metadata=dict(total_size=total), weight_map=weight_map)
    (net / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if pipeline:
        pipe = {"_class_name": pipeline, "_diffusers_version": __version__, **extra, sub: ["diffusers", cls.__name__]}
        (Path(folder) / "model_index.json").write_text(json.dumps(pipe, indent=2))
    return Path(folder)


def _draw(key: str, shape, dtype, generator) -> torch.Tensor:
    if len(shape) == 1:
        return (torch.zeros if key.endswith("bias") else torch.ones)(shape, dtype=dtype)
    fan_in = max(1, torch.Size(shape)[1:].numel())
    return (torch.randn(shape, generator=generator) / fan_in ** 0.5).to(dtype)


def _save_shard(tensors: dict, net: Path, index: int, save_file) -> tuple:
    from ..artifacts import usual_mode

    path = net / f".shard-{index}.safetensors"
    save_file(tensors, str(path))
    usual_mode(path)                                     # safetensors writes 0600
    return path, list(tensors), sum(t.numel() * t.element_size() for t in tensors.values())


@contextlib.contextmanager
def _default_dtype(dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def parameters(name: str, blocks=None, transformer_depths=None) -> int:
    """Parameter count of a (cut) real configuration, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = _network_class(name)(**config(name, blocks, transformer_depths))
    return sum(p.numel() for p in model.parameters())


def _network_class(name: str):
    import diffusers

    default = "FluxTransformer2DModel" if MODELS[name][1] == "transformer" else "UNet2DConditionModel"
    return getattr(diffusers, CLASSES.get(name, default))
