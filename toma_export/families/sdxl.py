"""SDXL (UNet2DConditionModel): everything the toolkit knows about this family, in one module.

The spec (SDXL base and a tiny trained UNet with text_time conditioning and two transformer levels, like
SDXL's 64x64 and 32x32 levels at 1024 px): loading, sizes, the exported graph's layout and sample inputs,
the Euler loop, the pipeline and how its call of the UNet becomes the graph's inputs. Then the ToMA patch
hooks, and the 64x64-level block the benchmark times.

ToMA on SDXL: each BasicTransformerBlock merges the normalised tokens entering a sub-layer, runs the
sub-layer on the merged tokens and adds the unmerged output to the full-resolution residual. Self-attention, the text
cross-attention and the feed-forward are all merged by default: at SDXL's 64x64 level these three make up
nearly all of the block's time, and all three see the same near-hard assignment (a token receives its
destination's output), which is also what ToMA does to the parallel MLP of FLUX single blocks. Set
`sublayers=("attn",)` for the attention-only variant. The group is one Transformer2DModel (2 or 10
blocks in SDXL): its first block selects, the rest reuse. Only the highest-resolution transformer level is
merged by default, as in tomesd and ToMA's 8x8-window setting: the coarser levels have few tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

from ..errors import UsageError
from ..toma.tiles import fold, unfold
from .spec import ModelSpec, model_output, noise, per_sample, refuse, smooth_tokens

NETWORK_CLASS, LABEL = "UNet2DConditionModel", "SDXL UNet"
# config fields the spec relies on, read from a local folder's config.json
CONFIG_KEYS = ("in_channels", "cross_attention_dim", "projection_class_embeddings_input_dim",
               "addition_time_embed_dim", "down_block_types")

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
    model_cls = UNet2DConditionModel
    pipeline_class = "StableDiffusionXLPipeline"
    controlnet_pipeline_class = "StableDiffusionXLControlNetPipeline"
    default_guidance = 5.0
    # 8-bit: layers left in the network's precision, as NVIDIA's SDXL filter leaves them (time and text
    # embeddings, the first and last convolutions, the residual shortcuts, the transformers' output layers)
    quant_skip = ("time_embedding", "time_emb_proj", "add_embedding", "conv_in", "conv_out", "conv_shortcut",
                  "norm_out", "proj_out")

    def cfg_batch(self, guidance: float) -> int:
        return 2 if guidance > 1 else 1

    def control_kwargs(self, images: list, scales: list[float], modes=()) -> dict:
        """The pipeline call's arguments for its control images, one per ControlNet (no SDXL Union is supported, so
        no modes)."""
        one = len(images) == 1
        return dict(image=images[0] if one else list(images),
                    controlnet_conditioning_scale=scales[0] if one else list(scales))

    def tiny_parts(self) -> dict:
        from . import tiny

        c, seed = self.config, tiny.ENCODER_SEED
        pooled = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
        first = c["cross_attention_dim"] // 2
        return dict(text_encoder=tiny.clip(first, seed + 1), tokenizer=tiny.tokenizer(),
                    text_encoder_2=tiny.clip(c["cross_attention_dim"] - first, seed + 2, projection=pooled),
                    tokenizer_2=tiny.tokenizer(), vae=tiny.vae(c["in_channels"], seed + 3, "sdxl"))

    @property
    def time_ids(self) -> int:
        """Size conditioning per sample: original size, crop, target size (6); the refiner swaps the target
        size for an aesthetic score (5)."""
        return 5 if self.variant == "refiner" else 6

    def sample_inputs(self, batch=1, height=None, width=None, seed=0, dtype=torch.float32, smooth=False) -> dict:
        h, w = self.size(height, width)
        g = torch.Generator().manual_seed(seed)
        c = self.config
        pooled = c["projection_class_embeddings_input_dim"] - self.time_ids * c["addition_time_embed_dim"]
        ids = [h, w, 0, 0, h, w] if self.time_ids == 6 else [h, w, 0, 0, 6.0]
        return dict(
            sample=noise((batch, c["in_channels"], h // 8, w // 8), g, smooth, dtype),
            timestep=torch.full((batch,), 999.0, dtype=dtype),
            encoder_hidden_states=torch.randn(batch, self.text_len, c["cross_attention_dim"], generator=g).to(dtype),
            added_cond_kwargs=dict(
                text_embeds=torch.randn(batch, pooled, generator=g).to(dtype),
                time_ids=torch.tensor([ids], dtype=dtype).repeat(batch, 1),
            ),
        )

    @property
    def cell_multiple(self) -> int:
        return 2 ** (len(self.config.get("down_block_types", (0, 0, 0))) - 1)

    # Graph layout: added_cond_kwargs flattened into text_embeds and time_ids; with ControlNet residuals, one
    # input per down residual (control_down.i) and the mid one (control_mid), as ControlNetModel returns them.
    def input_axes(self) -> dict:
        batch = ("batch", 1)
        axes = dict(sample={0: batch, 2: ("height", 1), 3: ("width", 1)}, timestep={0: batch},
                    encoder_hidden_states={0: batch, 1: ("text", 1)}, text_embeds={0: batch}, time_ids={0: batch})
        if self.control:
            axes.update(residual_axes(self.architecture()))
        return axes

    def graph_inputs(self, batch=1, height=None, width=None, seed=0, dtype=torch.float32, smooth=False) -> dict:
        x = self.sample_inputs(batch, height, width, seed, dtype, smooth)
        x.update(x.pop("added_cond_kwargs"))
        x.update(self.extra_inputs(x, seed))
        return {name: x[name] for name in self.input_axes()}

    def extra_inputs(self, x: dict, seed: int) -> dict:
        """Sample inputs beyond the UNet call's (given the others, `x`): ControlNet residuals where it takes them."""
        return sample_residuals(self.architecture(), x["sample"], seed) if self.control else {}

    def check_control(self, layout: tuple) -> None:
        own = len(residual_levels(self.architecture())[0])
        if layout != ("sdxl", own):
            raise UsageError(f"{self.name} takes a ControlNet with {own} down residuals (an SDXL ControlNetModel made "
                             f"from it); this one gives {layout[1:]} ({layout[0]} layout)")

    # Denoising loop (parity checks, serving): SDXL's Euler scheduler, scaled model input.
    latent_input = "sample"

    def scheduler(self):
        from diffusers import EulerDiscreteScheduler
        return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      timestep_spacing="leading", steps_offset=1)

    def step_inputs(self, inputs: dict, scheduler, latent, t) -> dict:
        batch = latent.shape[0]
        return dict(inputs, sample=scheduler.scale_model_input(latent, t), timestep=t.expand(batch).to(latent.dtype))

    def graph_call(self, model, sample, timestep, encoder_hidden_states, text_embeds, time_ids, *residuals):
        # The UNet concatenates text_embeds with fp32 time embeddings, which eager torch promotes to fp32;
        # the ONNX exporter emits that Concat without a Cast (invalid in fp16), so promote explicitly.
        cond = dict(text_embeds=text_embeds.float(), time_ids=time_ids)
        control = dict(down_block_additional_residuals=list(residuals[:-1]),
                       mid_block_additional_residual=residuals[-1]) if residuals else {}
        return model(sample, timestep, encoder_hidden_states, added_cond_kwargs=cond, return_dict=False,
                     **control)[0]

    # Serving: UNet2DConditionModel's call, added_cond_kwargs flattened, the timestep broadcast to the batch.
    def served_call(self, config, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                    attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                    down_block_additional_residuals=None, mid_block_additional_residual=None,
                    down_intrablock_additional_residuals=None, encoder_attention_mask=None, return_dict: bool = True):
        refuse(class_labels=class_labels, timestep_cond=timestep_cond, attention_mask=attention_mask,
               cross_attention_kwargs=cross_attention_kwargs,
               down_intrablock_additional_residuals=down_intrablock_additional_residuals,
               encoder_attention_mask=encoder_attention_mask)
        cond = added_cond_kwargs or {}
        if set(cond) - {"text_embeds", "time_ids"} or len(cond) != 2:
            raise UsageError(f"SDXL graphs take added_cond_kwargs text_embeds and time_ids, got {sorted(cond)}")
        b = sample.shape[0]
        net = dict(sample=sample, timestep=per_sample(timestep, b), encoder_hidden_states=encoder_hidden_states,
                   text_embeds=cond["text_embeds"], time_ids=cond["time_ids"])
        given = down_block_additional_residuals is not None or mid_block_additional_residual is not None
        if given != bool(self.control):
            raise UsageError("this UNet graph takes ControlNet residuals: serve it with its ControlNets" if self.control
                             else "this UNet graph takes no ControlNet residuals: export it with --controlnet")
        if given:
            names = residual_names(self.architecture())
            found = [*down_block_additional_residuals, mid_block_additional_residual]
            if len(found) != len(names):
                raise UsageError(f"the UNet graph takes {len(names)} ControlNet residuals, the call passed "
                                 f"{len(found)}")
            net.update(zip(names, found))

        def finish(out):
            return model_output(out.to(sample.dtype), return_dict, "diffusers.models.unets.unet_2d_condition",
                                "UNet2DConditionOutput")

        return net, timestep, (sample.shape[2] * self.pixels_per_cell, sample.shape[3] * self.pixels_per_cell), finish

    def network_attributes(self, config: dict) -> dict:
        # StableDiffusionXLPipeline._get_add_time_ids checks its time ids against this width
        width = config["projection_class_embeddings_input_dim"]
        return dict(add_embedding=SimpleNamespace(linear_1=SimpleNamespace(in_features=width)))


def residual_levels(config: dict) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(channels, level) of each down residual a ControlNetModel of this UNet config returns (conv_in, every
    resnet, every down-sampler but the last level's), and of its mid residual."""
    channels, n = list(config["block_out_channels"]), len(config["block_out_channels"])
    layers = config.get("layers_per_block", 2)
    layers = [layers] * n if isinstance(layers, int) else list(layers)
    down = [(channels[0], 0)]
    for level, (ch, k) in enumerate(zip(channels, layers)):
        down += [(ch, level)] * k + ([(ch, level + 1)] if level < n - 1 else [])
    return down, (channels[-1], n - 1)


def residual_names(config: dict) -> list[str]:
    return [f"control_down.{i}" for i in range(len(residual_levels(config)[0]))] + ["control_mid"]


def residual_axes(config: dict) -> dict:
    down, mid = residual_levels(config)
    return {name: {0: ("batch", 1), 2: ("height", 2 ** level), 3: ("width", 2 ** level)}
            for name, (_, level) in zip(residual_names(config), [*down, mid])}


def sample_residuals(config: dict, sample: torch.Tensor, seed: int) -> dict:
    """Residuals as a ControlNet of this UNet would give for `sample` (small random values)."""
    g = torch.Generator().manual_seed(seed + 1)
    b, _, h, w = sample.shape
    down, mid = residual_levels(config)
    return {name: (0.1 * torch.randn(b, ch, h // 2 ** level, w // 2 ** level, generator=g)).to(sample.dtype)
            for name, (ch, level) in zip(residual_names(config), [*down, mid])}


def specs() -> dict:
    return {
        "sdxl-tiny": SdxlSpec("sdxl-tiny", None, TINY, (128, 128), text_len=77, size_range=((128, 128), (128, 128),
                              (512, 512)), text_range=(77, 77, 154), batch_range=(1, 2, 4)),
        "sdxl": SdxlSpec("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", BASE, (1024, 1024), text_len=77,
                         size_range=((512, 512), (1024, 1024), (1536, 1536)), text_range=(77, 77, 231),
                         batch_range=(1, 2, 4)),
    }


def variant(config: dict, pipeline: dict) -> tuple[str, dict]:
    """base, or refiner: its pipeline asks for an aesthetic score, and a bare refiner UNet shows it in its
    added-condition width (pooled text as wide as its cross-attention, plus 5 time ids, not 6)."""
    if "requires_aesthetics_score" in pipeline:
        return ("refiner" if pipeline["requires_aesthetics_score"] else "base"), {}
    extra = config.get("projection_class_embeddings_input_dim", 0) - 5 * config.get("addition_time_embed_dim", 0)
    return ("refiner" if extra == config.get("cross_attention_dim") else "base"), {}


# -- ToMA patch hooks (toma_export.toma.patch drives them) --
def supports(model) -> bool:
    from diffusers.models.controlnets.controlnet import ControlNetModel

    return isinstance(model, (UNet2DConditionModel, ControlNetModel))


def _level(name: str, n_levels: int) -> int:
    """Resolution level of a UNet submodule: 0 = full latent resolution, each down-sampling adds one."""
    part, _, rest = name.partition(".")
    if part == "down_blocks":
        return int(rest.split(".")[0])
    if part == "up_blocks":
        return n_levels - 1 - int(rest.split(".")[0])
    return n_levels - 1  # mid_block


def candidates(model, config):
    """(name, block, group, mixin, default, downsample) for every transformer block; groups are
    Transformer2DModels, downsample is the group's token grid size relative to the latent (2**level)."""
    n_levels = len(model.down_blocks)
    found = []
    for group, t2d in model.named_modules():
        if isinstance(t2d, Transformer2DModel):
            for i, block in enumerate(t2d.transformer_blocks):
                if isinstance(block, BasicTransformerBlock):
                    found.append((f"{group}.transformer_blocks.{i}", block, group, _level(group, n_levels)))
    if not found:
        return []
    top = min(level for *_, level in found)
    return [(name, b, g, _Block, level < top + config.levels, 2 ** level) for name, b, g, level in found]


def check_block(name, block, config) -> None:
    """Refuse block layouts other than SDXL's instead of merging them wrongly."""
    problems = []
    if block.norm_type != "layer_norm":
        problems.append(f"norm_type={block.norm_type!r}")
    if block.pos_embed is not None:
        problems.append("a positional embedding")
    if block.only_cross_attention:
        problems.append("only_cross_attention")
    if problems:
        raise UsageError(f"ToMA cannot patch {name}: it has {', '.join(problems)}; only SDXL-style blocks "
                         "(layer_norm, no positional embedding) are supported")


def install_hooks(model, state, groups):
    """Advance the step clock on every UNet call; record each group's token grid from its input map."""

    def unet_pre(module, args, kwargs):
        if state.graph is None:
            state.begin_call(args[1] if len(args) > 1 else kwargs.get("timestep"))

    def grid_pre(group):
        def pre(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            state.grids[group] = (x.shape[-2], x.shape[-1])
        return pre

    handles = [model.register_forward_pre_hook(unet_pre, with_kwargs=True)]
    for group in groups:
        handles.append(model.get_submodule(group).register_forward_pre_hook(grid_pre(group), with_kwargs=True))
    return handles


class _Block:
    """Mixin swapped in front of BasicTransformerBlock (layer_norm variant, as in SDXL)."""

    _toma_sublayers = ("attn", "cross_attn", "mlp")

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        state = self._toma
        kwargs = dict(cross_attention_kwargs or {})
        if not state.merging or "gligen" in kwargs or attention_mask is not None:
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   timestep, kwargs or None, class_labels, added_cond_kwargs)
        # The block runs in tile order (tokens of each tile adjacent): every sub-layer is per token or,
        # with no positional embedding, permutation-equivariant, so only entry and exit copy the layout,
        # not each merge and unmerge (two copies per block instead of six).
        sub, tile, grid = state.config.sublayers, state.config.tile, state.grid(self._toma_group)
        hidden_states = fold(hidden_states, grid, tile).flatten(1, 2)
        norm = self.norm1(hidden_states)
        merge = state.merger(self._toma_group, norm, tiled=True)

        def run(name, x, layer):
            return merge.unmerge(layer(merge.merge(x, tiled=True)), tiled=True) if name in sub else layer(x)

        hidden_states = hidden_states + run("attn", norm, lambda x: self.attn1(x, attention_mask=attention_mask, **kwargs))
        if self.attn2 is not None:
            cross = lambda x: self.attn2(  # noqa: E731
                x, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask, **kwargs)
            hidden_states = hidden_states + run("cross_attn", self.norm2(hidden_states), cross)
        hidden_states = hidden_states + run("mlp", self.norm3(hidden_states), self.ff)
        return unfold(hidden_states.unflatten(1, (-1, tile[0] * tile[1])), grid, tile)


# -- the benchmark's block --
def bench_block(grid: int = 64, seed: int = 0) -> dict:
    """SDXL's 64x64-level BasicTransformerBlock: width 640, 10 heads of 64, GEGLU, text over 77 x 2048
    (`grid` other than 64 only to make quick runs quicker). The fields of toma_export.bench.blocks.BlockCase."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = BasicTransformerBlock(640, 10, 64, cross_attention_dim=2048, activation_fn="geglu",
                                      norm_type="layer_norm").eval()
        inputs = dict(hidden_states=smooth_tokens((1, grid, grid, 640)).flatten(1, 2),
                      context=torch.randn(1, 77, 2048))
    return dict(name=f"sdxl-block-{grid}x{grid}", description=f"SDXL BasicTransformerBlock, {grid}x{grid} level "
                f"({grid * grid} tokens, width 640, 10 heads, cross-attention 77x2048)", block=block, inputs=inputs,
                grid=(grid, grid), mixin=_Block, merge_pairs=3, extra={}, call=_bench_call)


def _bench_call(block, tables, hidden, context):
    return block(hidden, encoder_hidden_states=context)
