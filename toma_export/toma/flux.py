"""ToMA for diffusers FLUX.1 (FluxTransformer2DModel).

Double-stream blocks merge the image tokens inside attention only: the text stream and the image MLP stay
at full resolution, text queries see merged image keys/values. Single-stream blocks run attention, the
parallel MLP and proj_out on [text; merged image] and unmerge before gate and residual. A merged token
takes the RoPE position of its destination, so each batch element gets its own rotary table; that is why
the joint attention is computed here rather than by the module's processor (which takes one table).
Unmerging after to_out/proj_out instead of before is exact: the unmerge rows sum to one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

from ..errors import UsageError

DOUBLE, SINGLE = "transformer_blocks", "single_transformer_blocks"
# The official run leaves the first 5 of 19 double and 5 of 38 single blocks unmerged.
_SKIP = {DOUBLE: 5 / 19, SINGLE: 5 / 38}


def supports(model) -> bool:
    return isinstance(model, FluxTransformer2DModel)


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
    names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids")
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
