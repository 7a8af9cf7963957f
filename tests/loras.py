"""LoRA files for the tiny models, in the two formats users bring.

- diffusers/peft: made the way trainers make them: peft adds random adapters to the network, and diffusers'
  own `save_lora_weights` writes them with their adapter metadata (lora_alpha, r).
- kohya: written by hand here, since kohya's trainer is not a package: `lora_unet_<module path with _>` keys
  with lora_down / lora_up / alpha. FLUX files use the original (BFL) module names that diffusers converts.
"""
from __future__ import annotations

import torch

import toma_export as te

FLUX_TARGETS = ["to_q", "to_k", "proj_out", "ff.net.2"]
SDXL_TARGETS = ["to_q", "to_v", "ff.net.2", "proj_in"]


def peft_lora(model: str, folder, seed: int, rank: int = 4, alpha: int = 8, targets=None):
    """A diffusers-format LoRA file with random (non-zero) up and down weights; returns its path."""
    from diffusers import FluxPipeline, StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    spec = te.models.get(model)
    network = spec.load()
    targets = targets or (FLUX_TARGETS if spec.family == "flux" else SDXL_TARGETS)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network.add_adapter(config)
    layers = get_peft_model_state_dict(network)
    if spec.family == "flux":
        FluxPipeline.save_lora_weights(folder, transformer_lora_layers=layers,
                                       transformer_lora_adapter_metadata=config.to_dict())
    else:
        StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=layers,
                                                    unet_lora_adapter_metadata=config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def kohya_lora(model: str, path, seed: int, rank: int = 4, alpha: float = 2.0):
    """A kohya-format LoRA of a few layers of the tiny model; returns its path."""
    from safetensors.torch import save_file

    shapes = {k: v.shape for k, v in te.models.get(model).skeleton().state_dict().items()}
    if model.startswith("flux"):        # BFL names -> diffusers names, for layers kept whole by the converter
        layers = {"double_blocks_0_img_attn_proj": "transformer_blocks.0.attn.to_out.0",
                  "double_blocks_0_img_mlp_0": "transformer_blocks.0.ff.net.0.proj",
                  "single_blocks_0_linear2": "single_transformer_blocks.0.proj_out"}
    else:
        layers = {m.replace(".", "_"): m for m in ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                                                    "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2")}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in layers.items():
        out, inp = shapes[f"{module}.weight"]
        tensors[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, inp, generator=g) * 0.1
        tensors[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out, rank, generator=g) * 0.1
        tensors[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path
