"""ToMA for diffusers UNet2DConditionModel (SDXL).

Each BasicTransformerBlock merges the normalised tokens entering a sub-layer, runs the sub-layer on the
merged tokens and adds the unmerged output to the full-resolution residual. Self-attention, the text
cross-attention and the feed-forward are all merged by default: at SDXL's 64x64 level these three make up
nearly all of the block's time, and all three see the same near-hard assignment (a token receives its
destination's output), which is also what ToMA does to the parallel MLP of FLUX single blocks. Set
`sublayers=("attn",)` for the attention-only variant. The group is one Transformer2DModel (2 or 10
blocks in SDXL): its first block selects, the rest reuse. Only the highest-resolution transformer level is
merged by default, as in tomesd and ToMA's 8x8-window setting: the coarser levels have few tokens.
"""
from __future__ import annotations

from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

from ..errors import UsageError


def supports(model) -> bool:
    return isinstance(model, UNet2DConditionModel)


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
        if not state.merging or "gligen" in kwargs:
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   timestep, kwargs or None, class_labels, added_cond_kwargs)
        sub = state.config.sublayers
        norm = self.norm1(hidden_states)
        merge = state.merger(self._toma_group, norm)

        def run(name, x, layer):
            return merge.unmerge(layer(merge.merge(x))) if name in sub else layer(x)

        hidden_states = hidden_states + run("attn", norm, lambda x: self.attn1(x, attention_mask=attention_mask, **kwargs))
        if self.attn2 is not None:
            cross = lambda x: self.attn2(  # noqa: E731
                x, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask, **kwargs)
            hidden_states = hidden_states + run("cross_attn", self.norm2(hidden_states), cross)
        return hidden_states + run("mlp", self.norm3(hidden_states), self.ff)
