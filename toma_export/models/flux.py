"""FLUX.1 transformer specs: the real FLUX.1-dev and a tiny random one with the same block structure."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import ModelSpec, noise

TINY = dict(patch_size=1, in_channels=16, num_layers=4, num_single_layers=8, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
            axes_dims_rope=(4, 6, 6))
# FLUX.1-dev: 19 double + 38 single blocks, 24 heads x 128, T5 text width 4096, CLIP pooled 768.
DEV = dict(in_channels=64, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)


@dataclass(frozen=True)
class FluxSpec(ModelSpec):
    family = "flux"
    subfolder = "transformer"
    pixels_per_token = 16   # 8x VAE, then 2x2 latent patches per token
    size_multiple = 16

    @property
    def model_cls(self):
        from diffusers import FluxTransformer2DModel
        return FluxTransformer2DModel

    def sample_inputs(self, batch=1, height=None, width=None, seed=0, dtype=torch.float32, smooth=False) -> dict:
        rows, cols = self.token_grid(height, width)
        g = torch.Generator().manual_seed(seed)
        c = self.config
        latent = noise((batch, c["in_channels"], rows, cols), g, smooth, dtype)
        img_ids = torch.zeros(rows, cols, 3)
        img_ids[..., 1] = torch.arange(rows)[:, None]
        img_ids[..., 2] = torch.arange(cols)[None, :]
        inputs = dict(
            hidden_states=latent.flatten(2).transpose(1, 2).contiguous(),
            encoder_hidden_states=torch.randn(batch, self.text_len, c["joint_attention_dim"], generator=g).to(dtype),
            pooled_projections=torch.randn(batch, c["pooled_projection_dim"], generator=g).to(dtype),
            timestep=torch.full((batch,), 1.0, dtype=dtype),
            img_ids=img_ids.reshape(-1, 3).to(dtype),
            txt_ids=torch.zeros(self.text_len, 3, dtype=dtype),
        )
        if c.get("guidance_embeds"):
            inputs["guidance"] = torch.full((batch,), 3.5, dtype=dtype)
        return inputs


def specs() -> dict:
    return {
        "flux-tiny": FluxSpec("flux-tiny", None, TINY, (256, 256), text_len=16),
        "flux": FluxSpec("flux", "black-forest-labs/FLUX.1-dev", DEV, (1024, 1024), text_len=512),
    }
