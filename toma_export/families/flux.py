"""FLUX.1 (FluxTransformer2DModel): everything the toolkit knows about this family, in one module.

The spec (FLUX.1-dev and a tiny model with the same block structure, trained on the shapes world): loading,
sizes, the exported graph's layout and sample inputs, the flow-matching loop, the pipeline and how its call of
the transformer becomes the graph's inputs. Then the ToMA patch hooks, and the single-stream block the benchmark times.

ToMA on FLUX: double-stream blocks merge the image tokens inside attention only: the text stream and the image MLP stay
at full resolution, text queries see merged image keys/values. Single-stream blocks run attention, the
parallel MLP and proj_out on [text; merged image] and unmerge before gate and residual. A merged token
takes the RoPE position of its destination, so each batch element gets its own rotary table; that is why
the joint attention is computed here rather than by the module's processor (which takes one table).
Unmerging after to_out/proj_out instead of before is exact: the unmerge rows sum to one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

from ..errors import UsageError
from .spec import ModelSpec, model_output, noise, per_sample, refuse, smooth_tokens

NETWORK_CLASS, LABEL = "FluxTransformer2DModel", "FLUX transformer"
# config fields the spec relies on, read from a local folder's config.json
CONFIG_KEYS = ("in_channels", "out_channels", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds")
FLUX_WIDTH = 3072          # FLUX.1's real width (24 heads of 128)

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
    model_cls = FluxTransformer2DModel
    default_guidance = 3.5

    @property
    def channel_control(self) -> bool:
        """A control model that concatenates the control image's latents as input channels (BFL's FLUX.1
        Canny/Depth: 128 in, 64 out), served through FluxControlPipeline."""
        return concatenates(self.config)

    @property
    def pipeline_class(self) -> str:
        return "FluxControlPipeline" if self.channel_control else "FluxPipeline"

    controlnet_pipeline_class = "FluxControlNetPipeline"

    def control_kwargs(self, images: list, scales: list[float], modes=()) -> dict:
        """The pipeline call's arguments for its control images (one per ControlNet, or the channel-concat model's)
        and the Union ControlNets' modes (None for the others, as FluxControlNetPipeline takes them)."""
        if self.channel_control:
            return dict(control_image=images[0])
        one = len(images) == 1
        out = dict(control_image=images[0] if one else list(images),
                   controlnet_conditioning_scale=scales[0] if one else list(scales))
        if any(m is not None for m in modes):
            out["control_mode"] = modes[0] if one else list(modes)
        return out

    @property
    def latent_channels(self) -> int:
        """Channels of the packed image latent (the VAE's, times 4): the output's; a channel-concat control model
        takes twice as many."""
        c = self.config
        return c.get("out_channels") or c["in_channels"]

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
    # rebuilt in the graph from them); everything else as the transformer takes it. With ControlNet residuals,
    # one (B, H, W, width) input per ControlNet block (control_block.i, control_single.i); the graph applies
    # diffusers' interval rule.
    def input_axes(self) -> dict:
        batch, text = ("batch", 1), ("text", 1)
        axes = dict(hidden_states={0: batch, 1: ("height", 1), 2: ("width", 1)},
                    encoder_hidden_states={0: batch, 1: text}, pooled_projections={0: batch}, timestep={0: batch},
                    txt_ids={0: text})
        if self.config.get("guidance_embeds"):
            axes["guidance"] = {0: batch}
        grid = {0: batch, 1: ("height", 1), 2: ("width", 1)}
        return {**axes, **{name: grid for name in residual_names(self.control)}}

    def graph_inputs(self, batch=1, height=None, width=None, seed=0, dtype=torch.float32, smooth=False) -> dict:
        x = self.sample_inputs(batch, height, width, seed, dtype, smooth)
        rows, cols = self.token_grid(height, width)
        x["hidden_states"] = x["hidden_states"].reshape(batch, rows, cols, -1)
        del x["img_ids"]
        x.update(self.extra_inputs(x, seed))
        return {name: x[name] for name in self.input_axes()}

    def extra_inputs(self, x: dict, seed: int) -> dict:
        """Sample inputs beyond the transformer call's (given the others, `x`): ControlNet residuals (small random
        values) where it takes them."""
        g = torch.Generator().manual_seed(seed + 1)
        b, rows, cols, _ = x["hidden_states"].shape
        return {name: (0.1 * torch.randn(b, rows, cols, self.inner_width(), generator=g)).to(x["hidden_states"].dtype)
                for name in residual_names(self.control)}

    def check_control(self, layout: tuple) -> None:
        if layout[0] != "flux" or len(layout) != 4:
            raise UsageError(f"{self.name} is a FLUX transformer; this ControlNet gives {layout[0]} residuals")

    def graph_call(self, model, *inputs):
        x = dict(zip(self.input_axes(), inputs))
        b, h, w, c = x["hidden_states"].shape
        flat = lambda t: t.reshape(b, h * w, t.shape[-1])  # noqa: E731
        double, single = residual_names(self.control, "block"), residual_names(self.control, "single")
        control = dict(controlnet_block_samples=[flat(x[n]) for n in double] or None,
                       controlnet_single_block_samples=[flat(x[n]) for n in single] or None,
                       controlnet_blocks_repeat=bool(self.control[3])) if self.control else {}
        return model(hidden_states=flat(x["hidden_states"]), encoder_hidden_states=x["encoder_hidden_states"],
                     pooled_projections=x["pooled_projections"], timestep=x["timestep"],
                     img_ids=image_ids(h, w, x["txt_ids"]), txt_ids=x["txt_ids"], guidance=x.get("guidance"),
                     return_dict=False, **control)[0]


    # First-Block Cache: the network as two graphs that share only hidden states. The head embeds and runs the
    # first double block (never merged: ToMA leaves FLUX's first blocks alone) and also applies the output layers
    # to its output plus the last computed tail residual: a cached step's prediction, so a skipped step needs no
    # other graph. The tail runs the other blocks (with ToMA) and the output layers, and returns its residual.
    parts = ("head", "tail")
    head_block = "transformer_blocks.0"
    # 8-bit: layers left in the network's precision, as NVIDIA's FLUX filter leaves them (the embedders, the
    # AdaLN modulations that read the time embedding, the output layers)
    quant_skip = ("time_text_embed", "context_embedder", "x_embedder", "norm", "proj_out")

    def part_axes(self, part: str) -> dict:
        grid = {0: ("batch", 1), 1: ("height", 1), 2: ("width", 1)}
        if part == "head":
            return {**self.input_axes(), TAIL_RESIDUAL: grid}
        return {HIDDEN: grid, TEXT: {0: ("batch", 1), 1: ("text", 1)}, TEMB: {0: ("batch", 1)},
                "txt_ids": {0: ("text", 1)}}

    def part_outputs(self, part: str) -> list[str]:
        return [CACHED_PRED, HIDDEN, TEXT, TEMB, HEAD_RESIDUAL] if part == "head" else [self.output_name,
                                                                                       TAIL_RESIDUAL]

    def part_inputs(self, part: str, net: dict) -> dict:
        """Sample inputs of a part from the whole graph's (`graph_inputs`)."""
        b, h, w, _ = net["hidden_states"].shape
        width = self.inner_width()
        hidden = torch.zeros(b, h, w, width, dtype=net["hidden_states"].dtype)
        if part == "head":
            return dict(net, **{TAIL_RESIDUAL: hidden})
        text = net["encoder_hidden_states"]
        return {HIDDEN: hidden, TEXT: torch.zeros(b, text.shape[1], width, dtype=text.dtype),
                TEMB: torch.zeros(b, width, dtype=text.dtype), "txt_ids": net["txt_ids"]}

    def cache_io(self) -> tuple[str, str, str]:
        """(the head's cached-step prediction, the head residual, the tail residual): what a cached loop reads."""
        return CACHED_PRED, HEAD_RESIDUAL, TAIL_RESIDUAL

    def inner_width(self) -> int:
        a = self.architecture()
        return a["num_attention_heads"] * a["attention_head_dim"]

    def part_call(self, part: str, model, *inputs) -> tuple:
        names = list(self.part_axes(part))
        return (_head if part == "head" else _tail)(model, **dict(zip(names, inputs)))

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

    def tiny_parts(self) -> dict:
        from . import tiny

        c, seed = self.config, tiny.ENCODER_SEED
        return dict(text_encoder=tiny.clip(c["pooled_projection_dim"], seed + 1), tokenizer=tiny.tokenizer(),
                    text_encoder_2=tiny.t5(c["joint_attention_dim"], seed + 2), tokenizer_2=tiny.tokenizer(self.text_len),
                    vae=tiny.vae(self.latent_channels // 4, seed + 3, "flux"))

    # Serving: FluxPipeline packs the latent as (B, H*W, C) tokens with img_ids; the graph takes (B, H, W, C)
    # and rebuilds img_ids itself, so the grid is read off img_ids and checked.
    def served_call(self, config, hidden_states, encoder_hidden_states=None, pooled_projections=None,
                    timestep=None, img_ids=None, txt_ids=None, guidance=None, joint_attention_kwargs=None,
                    controlnet_block_samples=None, controlnet_single_block_samples=None, return_dict: bool = True,
                    controlnet_blocks_repeat=False):
        refuse(joint_attention_kwargs=joint_attention_kwargs)
        b, n, c = hidden_states.shape
        rows, cols = raster_grid(img_ids, n)
        if txt_ids.ndim == 3:                      # deprecated batched ids: every row is the same
            txt_ids = txt_ids[0]
        net = dict(hidden_states=hidden_states.reshape(b, rows, cols, c), encoder_hidden_states=encoder_hidden_states,
                   pooled_projections=pooled_projections, timestep=per_sample(timestep, b), txt_ids=txt_ids)
        if config.get("guidance_embeds"):
            if guidance is None:
                raise UsageError("this FLUX graph embeds guidance: the call must pass guidance")
            net["guidance"] = per_sample(guidance, b)
        net.update(self._served_residuals(controlnet_block_samples, controlnet_single_block_samples,
                                          controlnet_blocks_repeat, rows, cols))

        def finish(out):
            out = out.reshape(b, n, -1).to(hidden_states.dtype)
            return model_output(out, return_dict, "diffusers.models.modeling_outputs", "Transformer2DModelOutput")

        return net, timestep, (rows * self.pixels_per_token, cols * self.pixels_per_token), finish


    def _served_residuals(self, double, single, repeat, rows: int, cols: int) -> dict:
        """A pipeline's ControlNet residuals as the graph's inputs, checked against the layout it was exported for."""
        given = double is not None or single is not None
        if given != bool(self.control):
            raise UsageError("this FLUX graph takes ControlNet residuals: serve it with its ControlNets" if self.control
                             else "this FLUX graph takes no ControlNet residuals: export it with --controlnet")
        if not given:
            return {}
        found = ("flux", len(double or ()), len(single or ()), int(bool(repeat)))
        if found != self.control:
            raise UsageError(f"the FLUX graph takes ControlNet residuals laid out as {self.control[1:]} (double, "
                             f"single, repeat), the call passed {found[1:]}: export it with this ControlNet")
        values = [*(double or ()), *(single or ())]
        return {name: v.reshape(v.shape[0], rows, cols, -1) for name, v in zip(residual_names(self.control), values)}


def residual_names(control: tuple, kind: str | None = None) -> list[str]:
    """The graph's ControlNet residual inputs for a layout ("flux", double blocks, single blocks, repeat):
    control_block.i, then control_single.i; `kind` "block" or "single" picks one."""
    if not control:
        return []
    _, double, single, _ = control
    names = {"block": [f"control_block.{i}" for i in range(double)],
             "single": [f"control_single.{i}" for i in range(single)]}
    return names[kind] if kind else names["block"] + names["single"]


# the graphs' names for what passes between head and tail (see FluxSpec.parts)
HIDDEN, TEXT, TEMB = "fbcache_hidden", "fbcache_text", "fbcache_temb"
HEAD_RESIDUAL, TAIL_RESIDUAL, CACHED_PRED = "fbcache_head_residual", "fbcache_tail_residual", "noise_pred_cached"


def _rotary(model, txt_ids, rows: int, cols: int):
    return model.pos_embed(torch.cat((txt_ids, image_ids(rows, cols, txt_ids)), dim=0))


def _head(model, hidden_states, encoder_hidden_states, pooled_projections, timestep, txt_ids, guidance=None,
          **residual):
    """FluxTransformer2DModel.forward up to and including the first double block, as diffusers runs it."""
    b, h, w, c = hidden_states.shape
    x = model.x_embedder(hidden_states.reshape(b, h * w, c))
    t = timestep.to(x.dtype) * 1000
    temb = (model.time_text_embed(t, pooled_projections) if guidance is None else
            model.time_text_embed(t, guidance.to(x.dtype) * 1000, pooled_projections))
    text = model.context_embedder(encoder_hidden_states)
    text, out = model.transformer_blocks[0](hidden_states=x, encoder_hidden_states=text, temb=temb,
                                            image_rotary_emb=_rotary(model, txt_ids, h, w))
    cached = out + residual[TAIL_RESIDUAL].reshape(b, h * w, -1)
    cached = model.proj_out(model.norm_out(cached, temb))
    grid = lambda v: v.reshape(b, h, w, -1)  # noqa: E731
    return cached, grid(out), text, temb, grid(out - x)


def _tail(model, fbcache_hidden, fbcache_text, fbcache_temb, txt_ids):
    """The rest of FluxTransformer2DModel.forward after the first double block."""
    b, h, w, d = fbcache_hidden.shape
    start = fbcache_hidden.reshape(b, h * w, d)
    rotary = _rotary(model, txt_ids, h, w)
    x, text = start, fbcache_text
    for block in [*model.transformer_blocks[1:], *model.single_transformer_blocks]:
        text, x = block(hidden_states=x, encoder_hidden_states=text, temb=fbcache_temb, image_rotary_emb=rotary)
    return model.proj_out(model.norm_out(x, fbcache_temb)), (x - start).reshape(b, h, w, d)


def concatenates(config: dict) -> bool:
    """Whether a FLUX transformer config takes more input channels than it gives: a control image's latents
    concatenated to the image's."""
    given = config.get("in_channels", 64)
    return given > (config.get("out_channels") or given)


def variant(config: dict, pipeline: dict) -> tuple[str, dict]:
    """dev embeds the guidance scale and takes 512 text tokens; schnell embeds none and its pipelines
    default to 256 (the length its T5 was distilled with). A model taking more input channels than it gives
    concatenates a control image's latents (FLUX.1 Canny/Depth): "-control"."""
    concat = "-control" if concatenates(config) else ""
    if config.get("guidance_embeds"):
        return "dev" + concat, dict(text_len=512, text_range=(1, 512, 512))
    return "schnell" + concat, dict(text_len=256, text_range=(1, 256, 512))


def image_ids(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """FLUX image position ids (0, row, col) in raster order, (rows*cols, 3)."""
    r = torch.arange(rows, device=like.device).to(like.dtype)[:, None].expand(rows, cols)
    c = torch.arange(cols, device=like.device).to(like.dtype)[None, :].expand(rows, cols)
    return torch.stack([torch.zeros_like(r), r, c], dim=-1).reshape(rows * cols, 3)


def raster_grid(img_ids, n: int) -> tuple[int, int]:
    """(rows, cols) of the raster image grid img_ids describe; anything else (reference-image tokens,
    Kontext) is refused because the exported graph rebuilds raster ids from the grid."""
    if img_ids is None:
        raise UsageError("FLUX calls must pass img_ids (the graph needs the token grid)")
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if rows * cols != n or not torch.equal(ids.float().cpu(), image_ids(rows, cols, ids.float().cpu())):
        raise UsageError(f"img_ids do not describe one raster grid of the {n} image tokens (extra reference-image "
                         "tokens?); exported FLUX graphs take a single image grid")
    return rows, cols


def specs() -> dict:
    return {
        # trained at 128 then 256 px; 256 (a 16x16 token grid) is its default, where a 4x4 tile is 1/16 of it
        "flux-tiny": FluxSpec("flux-tiny", None, TINY, (256, 256), text_len=16,
                              size_range=((128, 128), (256, 256), (512, 512)), text_range=(1, 16, 32)),
        "flux": FluxSpec("flux", "black-forest-labs/FLUX.1-dev", DEV, (1024, 1024), text_len=512,
                         size_range=((512, 512), (1024, 1024), (1536, 1536)), text_range=(1, 512, 512)),
        # the channel-concat layout at tiny size (16 latent + 16 control channels), untrained: the served path of
        # FluxControlPipeline end to end, not a model that follows its control
        "flux-tiny-canny": FluxSpec("flux-tiny-canny", None, dict(TINY, in_channels=32, out_channels=16), (256, 256),
                                    text_len=16, size_range=((128, 128), (256, 256), (512, 512)),
                                    text_range=(1, 16, 32), variant="control"),
        # BFL's control model: the Canny edge map's latents concatenated as 64 more input channels
        "flux-canny": FluxSpec("flux-canny", "black-forest-labs/FLUX.1-Canny-dev",
                               dict(DEV, in_channels=128, out_channels=64), (1024, 1024), text_len=512,
                               size_range=((512, 512), (1024, 1024), (1536, 1536)), text_range=(1, 512, 512),
                               variant="dev-control"),
    }


# -- ToMA patch hooks (toma_export.toma.patch drives them) --
DOUBLE, SINGLE = "transformer_blocks", "single_transformer_blocks"
# The official run leaves the first 5 of 19 double and 5 of 38 single blocks unmerged.
_SKIP = {DOUBLE: 5 / 19, SINGLE: 5 / 38}


def supports(model) -> bool:
    from diffusers.models.controlnets.controlnet_flux import FluxControlNetModel

    return isinstance(model, (FluxTransformer2DModel, FluxControlNetModel))


def candidates(model, config):
    """(name, block, group, mixin, default, downsample) for every block ToMA can patch; the token grid
    is the transformer's input grid, so downsample is 1."""
    out = []
    for group, mixin in ((DOUBLE, _DoubleBlock), (SINGLE, _SingleBlock)):
        blocks = getattr(model, group)
        skip = round(_SKIP[group] * len(blocks))
        for i, block in enumerate(blocks):
            out.append((f"{group}.{i}", block, group, mixin, i >= skip, 1))
    return out


def check_block(name, block, config) -> None:
    """FLUX blocks have a single layout; nothing to refuse."""


def install_hooks(model, state, groups):
    """Advance the step clock and read the token grid from img_ids on every call of the transformer."""

    def pre(module, args, kwargs):
        if state.graph is not None:
            return                       # the caller owns the call: it set the grid (img_ids are data)
        bound = _bind(module, args, kwargs)
        state.begin_call(bound.get("timestep"))
        grid = token_grid(bound["img_ids"], bound["hidden_states"].shape[1])
        for g in groups:
            state.grids[g] = grid

    return [model.register_forward_pre_hook(pre, with_kwargs=True)]


def _bind(module, args, kwargs) -> dict:
    """The call's arguments by name, positional ones named by the class's own forward (the transformer and the
    ControlNet order them differently; a wrapper such as 8-bit calibration's may replace the instance's)."""
    if not args:
        return dict(kwargs)
    import inspect

    names = [p for p in inspect.signature(type(module).forward).parameters if p != "self"]
    return {**dict(zip(names, args)), **kwargs}


def token_grid(img_ids: torch.Tensor, n_tokens: int) -> tuple[int, int]:
    """(H, W) of the packed latent from img_ids (row, col in columns 1 and 2, raster order)."""
    ids = img_ids.reshape(-1, img_ids.shape[-1])
    h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if h * w != n_tokens or ids.shape[0] != n_tokens:
        raise UsageError(
            f"ToMA: img_ids describe a {h}x{w} grid but hidden_states has {n_tokens} image tokens; "
            "ToMA needs one raster-ordered image grid (no extra reference-image tokens)"
        )
    return h, w


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotary embedding; x (B, S, heads, D), cos/sin (S, D) or per batch (B, S, D)."""
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    re, im = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-im, re], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def joint_attention(attn, image, text, cos, sin):
    """FluxAttention on [text; image] with a (possibly per-batch) rotary table. Returns the image output
    (after to_out) and the text output (after to_add_out), or the whole sequence when text is None."""
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(image).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(image), attn.to_k(image), attn.to_v(image)
    heads = lambda t: t.unflatten(-1, (-1, attn.head_dim))  # noqa: E731
    q, k, v = attn.norm_q(heads(q)), attn.norm_k(heads(k)), heads(v)
    if text is not None:
        if getattr(attn, "fused_projections", False):
            tq, tk, tv = attn.to_added_qkv(text).chunk(3, dim=-1)
        else:
            tq, tk, tv = attn.add_q_proj(text), attn.add_k_proj(text), attn.add_v_proj(text)
        q = torch.cat([attn.norm_added_q(heads(tq)), q], dim=1)
        k = torch.cat([attn.norm_added_k(heads(tk)), k], dim=1)
        v = torch.cat([heads(tv), v], dim=1)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out = out.transpose(1, 2).flatten(2).to(q.dtype)
    if text is None:
        return out
    text_out, image_out = out.split([text.shape[1], out.shape[1] - text.shape[1]], dim=1)
    return attn.to_out[1](attn.to_out[0](image_out)), attn.to_add_out(text_out)


def merged_rope(image_rotary_emb, merge, text_len: int):
    """Rotary tables for [text; merged image]: text rows as they are, image rows of the destinations."""
    out = []
    for table in image_rotary_emb:
        text = table[:text_len].unsqueeze(0).expand(merge.batch, -1, -1)
        out.append(torch.cat([text, merge.take(table[text_len:].unsqueeze(0))], dim=1))
    return out


class _DoubleBlock:
    """Mixin swapped in front of FluxTransformerBlock."""

    _toma_sublayers = ("attn",)

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        state = self._toma
        if not state.merging or joint_attention_kwargs:
            return super().forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
        norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        norm_e, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, emb=temb)
        merge = state.merger(self._toma_group, norm_h)
        cos, sin = merged_rope(image_rotary_emb, merge, encoder_hidden_states.shape[1])
        attn_img, attn_txt = joint_attention(self.attn, merge.merge(norm_h), norm_e, cos, sin)

        hidden_states = hidden_states + gate_msa.unsqueeze(1) * merge.unmerge(attn_img)
        norm_h = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * self.ff(norm_h)

        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * attn_txt
        norm_e = self.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * self.ff_context(norm_e)
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


class _SingleBlock:
    """Mixin swapped in front of FluxSingleTransformerBlock."""

    _toma_sublayers = ("attn", "mlp")

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        state = self._toma
        if not state.merging or joint_attention_kwargs:
            return super().forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
        sub = state.config.sublayers
        n_txt = encoder_hidden_states.shape[1]
        residual = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        norm_x, gate = self.norm(residual, emb=temb)
        norm_t, norm_i = norm_x[:, :n_txt], norm_x[:, n_txt:]
        merge = state.merger(self._toma_group, norm_i)
        merged_x = torch.cat([norm_t, merge.merge(norm_i)], dim=1)

        if "attn" in sub:
            attn_out = joint_attention(self.attn, merged_x, None, *merged_rope(image_rotary_emb, merge, n_txt))
        else:
            attn_out = joint_attention(self.attn, norm_x, None, *image_rotary_emb)
        mlp_out = self.act_mlp(self.proj_mlp(merged_x if "mlp" in sub else norm_x))

        if "attn" in sub and "mlp" in sub:          # proj_out on merged tokens, then unmerge its output
            out = self.proj_out(torch.cat([attn_out, mlp_out], dim=2))
            out = torch.cat([out[:, :n_txt], merge.unmerge(out[:, n_txt:])], dim=1)
        else:                                       # unmerge the merged branch first, proj_out at full size
            full = lambda t, merged: torch.cat([t[:, :n_txt], merge.unmerge(t[:, n_txt:])], 1) if merged else t  # noqa: E731
            out = self.proj_out(torch.cat([full(attn_out, "attn" in sub), full(mlp_out, "mlp" in sub)], dim=2))

        hidden_states = residual + gate.unsqueeze(1) * out
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states[:, :n_txt], hidden_states[:, n_txt:]


# -- the benchmark's block --
def bench_block(width: int = FLUX_WIDTH, grid: int = 64, text: int = 512, seed: int = 0) -> dict:
    """FLUX single-stream block at 1024x1024 px: 4096 image + 512 text tokens, heads of 128 as in FLUX.1;
    `width` below 3072 keeps the real head size and token counts with fewer heads. The fields of
    toma_export.bench.blocks.BlockCase."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed, FluxSingleTransformerBlock

    if width % 128:
        raise UsageError(f"the FLUX block width must be a multiple of the 128-wide heads, got {width}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = FluxSingleTransformerBlock(width, width // 128, 128).eval()
        inputs = dict(hidden_states=smooth_tokens((1, grid, grid, width)).flatten(1, 2),
                      text=torch.randn(1, text, width), temb=torch.randn(1, width))
    ids = torch.zeros(text + grid * grid, 3)
    ids[text:, 1] = torch.arange(grid).repeat_interleave(grid)
    ids[text:, 2] = torch.arange(grid).repeat(grid)
    cos, sin = FluxPosEmbed(10000, [16, 56, 56])(ids)
    share = "" if width == FLUX_WIDTH else f", {width / FLUX_WIDTH:.3g} of FLUX.1's width 3072"
    return dict(name=f"flux-single-block-w{width}", description=f"FLUX single-stream block ({grid * grid} image + {text} text "
                f"tokens, width {width}, {width // 128} heads of 128{share})", block=block, inputs=inputs,
                grid=(grid, grid), mixin=_SingleBlock, merge_pairs=1, extra=dict(cos=cos.float(), sin=sin.float()),
                call=_bench_call)


def _bench_call(block, tables, image, text, temb):
    text_out, image_out = block(image, text, temb, image_rotary_emb=(tables.cos, tables.sin))
    return torch.cat([text_out, image_out], dim=1)
