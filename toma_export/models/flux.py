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
    pixels_per_cell = 16    # the graph's spatial input is the token grid
    grid_is_input = True
    pipeline_class = "FluxPipeline"
    network_class = "FluxNetwork"
    default_guidance = 3.5

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

    # Graph layout: the packed latent as (B, H, W, C) so that H and W are axes of their own (img_ids are
    # rebuilt in the graph from them); everything else as the transformer takes it.
    def input_axes(self) -> dict:
        batch, text = ("batch", 1), ("text", 1)
        axes = dict(hidden_states={0: batch, 1: ("height", 1), 2: ("width", 1)},
                    encoder_hidden_states={0: batch, 1: text}, pooled_projections={0: batch}, timestep={0: batch},
                    txt_ids={0: text})
        if self.config.get("guidance_embeds"):
            axes["guidance"] = {0: batch}
        return axes

    def graph_inputs(self, batch=1, height=None, width=None, seed=0, dtype=torch.float32, smooth=False) -> dict:
        x = self.sample_inputs(batch, height, width, seed, dtype, smooth)
        rows, cols = self.token_grid(height, width)
        x["hidden_states"] = x["hidden_states"].reshape(batch, rows, cols, -1)
        del x["img_ids"]
        return {name: x[name] for name in self.input_axes()}

    def graph_call(self, model, hidden_states, encoder_hidden_states, pooled_projections, timestep, txt_ids,
                   guidance=None):
        b, h, w, c = hidden_states.shape
        return model(hidden_states=hidden_states.reshape(b, h * w, c), encoder_hidden_states=encoder_hidden_states,
                     pooled_projections=pooled_projections, timestep=timestep, img_ids=image_ids(h, w, txt_ids),
                     txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]


    # Denoising loop (parity checks, serving): flow-matching Euler, timestep given to the model as t/1000.
    latent_input = "hidden_states"

    def scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler
        return FlowMatchEulerDiscreteScheduler()

    def step_inputs(self, inputs: dict, scheduler, latent, t) -> dict:
        batch = latent.shape[0]
        return dict(inputs, hidden_states=latent, timestep=(t / 1000).expand(batch).to(latent.dtype))


    def pipeline_kwargs(self) -> dict:
        return dict(max_sequence_length=self.text_len)

    def tiny_parts(self, seed: int = 0) -> dict:
        from . import tiny

        c = self.config
        return dict(text_encoder=tiny.clip(c["pooled_projection_dim"], seed + 1), tokenizer=tiny.tokenizer(),
                    text_encoder_2=tiny.t5(c["joint_attention_dim"], seed + 2), tokenizer_2=tiny.tokenizer(self.text_len),
                    vae=tiny.vae(c["in_channels"] // 4, seed + 3, scaling_factor=0.3611, shift_factor=0.1159))


def image_ids(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """FLUX image position ids (0, row, col) in raster order, (rows*cols, 3)."""
    r = torch.arange(rows, device=like.device).to(like.dtype)[:, None].expand(rows, cols)
    c = torch.arange(cols, device=like.device).to(like.dtype)[None, :].expand(rows, cols)
    return torch.stack([torch.zeros_like(r), r, c], dim=-1).reshape(rows * cols, 3)


def specs() -> dict:
    return {
        "flux-tiny": FluxSpec("flux-tiny", None, TINY, (256, 256), text_len=16,
                              size_range=((128, 128), (256, 256), (512, 512)), text_range=(1, 16, 32)),
        "flux": FluxSpec("flux", "black-forest-labs/FLUX.1-dev", DEV, (1024, 1024), text_len=512,
                         size_range=((512, 512), (1024, 1024), (1536, 1536)), text_range=(1, 512, 512)),
    }
