"""SDXL UNet specs: the real SDXL base and a tiny random one with text_time conditioning and two
transformer levels (like SDXL's 64x64 and 32x32 levels at 1024 px)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import ModelSpec, noise

TINY = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 4), cross_attention_dim=64,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=32)
# SDXL base: CLIP-L + bigG hidden states (2048 wide), pooled text 1280, six time ids.
BASE = dict(in_channels=4, cross_attention_dim=2048, projection_class_embeddings_input_dim=2816,
            addition_time_embed_dim=256)


@dataclass(frozen=True)
class SdxlSpec(ModelSpec):
    family = "sdxl"
    subfolder = "unet"
    pixels_per_token = 16   # 8x VAE, then the first down-sampling: transformers start at level 1
    size_multiple = 32      # the latent is halved twice
    pixels_per_cell = 8     # the graph's spatial input is the latent
    pipeline_class = "StableDiffusionXLPipeline"
    network_class = "SdxlNetwork"
    default_guidance = 5.0

    def cfg_batch(self, guidance: float) -> int:
        return 2 if guidance > 1 else 1

    def tiny_parts(self, seed: int = 0) -> dict:
        from . import tiny

        c = self.config
        pooled = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
        first = c["cross_attention_dim"] // 2
        return dict(text_encoder=tiny.clip(first, seed + 1), tokenizer=tiny.tokenizer(),
                    text_encoder_2=tiny.clip(c["cross_attention_dim"] - first, seed + 2, projection=pooled),
                    tokenizer_2=tiny.tokenizer(), vae=tiny.vae(c["in_channels"], seed + 3, scaling_factor=0.13025))

    @property
    def model_cls(self):
        from diffusers import UNet2DConditionModel
        return UNet2DConditionModel

    def sample_inputs(self, batch=1, height=None, width=None, seed=0, dtype=torch.float32, smooth=False) -> dict:
        h, w = self.size(height, width)
        g = torch.Generator().manual_seed(seed)
        c = self.config
        pooled = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
        return dict(
            sample=noise((batch, c["in_channels"], h // 8, w // 8), g, smooth, dtype),
            timestep=torch.full((batch,), 999.0, dtype=dtype),
            encoder_hidden_states=torch.randn(batch, self.text_len, c["cross_attention_dim"], generator=g).to(dtype),
            added_cond_kwargs=dict(
                text_embeds=torch.randn(batch, pooled, generator=g).to(dtype),
                time_ids=torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype).repeat(batch, 1),
            ),
        )

    @property
    def cell_multiple(self) -> int:
        return 2 ** (len(self.config.get("down_block_types", (0, 0, 0))) - 1)

    # Graph layout: added_cond_kwargs flattened into text_embeds and time_ids.
    def input_axes(self) -> dict:
        batch = ("batch", 1)
        return dict(sample={0: batch, 2: ("height", 1), 3: ("width", 1)}, timestep={0: batch},
                    encoder_hidden_states={0: batch, 1: ("text", 1)}, text_embeds={0: batch}, time_ids={0: batch})

    def graph_inputs(self, batch=1, height=None, width=None, seed=0, dtype=torch.float32, smooth=False) -> dict:
        x = self.sample_inputs(batch, height, width, seed, dtype, smooth)
        x.update(x.pop("added_cond_kwargs"))
        return {name: x[name] for name in self.input_axes()}

    # Denoising loop (parity checks, serving): SDXL's Euler scheduler, scaled model input.
    latent_input = "sample"

    def scheduler(self):
        from diffusers import EulerDiscreteScheduler
        return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      timestep_spacing="leading", steps_offset=1)

    def step_inputs(self, inputs: dict, scheduler, latent, t) -> dict:
        batch = latent.shape[0]
        return dict(inputs, sample=scheduler.scale_model_input(latent, t), timestep=t.expand(batch).to(latent.dtype))

    def graph_call(self, model, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        # The UNet concatenates text_embeds with fp32 time embeddings, which eager torch promotes to fp32;
        # the ONNX exporter emits that Concat without a Cast (invalid in fp16), so promote explicitly.
        cond = dict(text_embeds=text_embeds.float(), time_ids=time_ids)
        return model(sample, timestep, encoder_hidden_states, added_cond_kwargs=cond, return_dict=False)[0]


def specs() -> dict:
    return {
        "sdxl-tiny": SdxlSpec("sdxl-tiny", None, TINY, (256, 256), text_len=77, size_range=((128, 128), (256, 256),
                              (512, 512)), text_range=(77, 77, 154), batch_range=(1, 2, 4)),
        "sdxl": SdxlSpec("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", BASE, (1024, 1024), text_len=77,
                         size_range=((512, 512), (1024, 1024), (1536, 1536)), text_range=(77, 77, 231),
                         batch_range=(1, 2, 4)),
    }
