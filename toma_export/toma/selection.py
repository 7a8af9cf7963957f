"""Greedy facility location: the destination selection of ToMA.

f(S) = sum_u max_{s in S} cos(u, s) is monotone submodular, so greedy picking gets within 1 - 1/e of the
best k-subset. All candidates are scored at once per step (one batched reduction), the k steps are
sequential. Picked indices are masked, so k <= n always yields k distinct tokens even for degenerate
inputs (identical tokens), where the official code could repeat a destination.
"""
from __future__ import annotations

import torch

from ..errors import UsageError

# Gains closer than this count as ties and go to the lowest index. Exact ties are common (two tokens that
# only cover each other give equal gains), and fp32 sums in different orders would otherwise break them by
# rounding noise, differently in every backend. 1e-4 of a cosine sum is far below any meaningful gain.
TIE_TOL = 1e-4


def similarity(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of tokens, (..., n, C) -> (..., n, n) in fp32.

    Computed from the Gram matrix: normalising its n x n entries by the square roots of its diagonal costs
    far less than normalising the n x C features first (the wide channel axis is read once, by the one
    matrix product), and the merge weights reuse the same matrix. Equal to cos(x_i, x_j) up to rounding.
    """
    x = x.float()
    gram = x @ x.transpose(-1, -2)
    norm = gram.diagonal(dim1=-2, dim2=-1).clamp_min(1e-24).sqrt()     # |x|, F.normalize's eps is 1e-12
    return gram / (norm.unsqueeze(-1) * norm.unsqueeze(-2))


def facility_location(x: torch.Tensor, k: int, impl: str = "torch") -> torch.Tensor:
    """Pick k destination tokens per problem, (B, n, C) any float dtype -> (B, k) int64, in greedy order.

    The first pick maximises the row sum of the similarity (f of a singleton); each later pick maximises
    the exact marginal gain sum_u relu(sim(v, u) - cover(u)). Ties (within TIE_TOL) go to the lowest index.
    impl="triton" runs the Triton kernel of plugins/ (CUDA tensors, or CPU under TRITON_INTERPRET=1).
    """
    if x.dim() != 3:
        raise UsageError(f"facility_location expects x of shape (B, n, C), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"facility_location expects floating-point features, got {x.dtype}")
    n = x.shape[1]
    if not 1 <= k <= n:
        raise UsageError(f"facility_location: k={k} destinations must be between 1 and the {n} tokens per problem")
    if impl == "triton":
        return _triton(x, k)
    if impl != "torch":
        raise UsageError(f"facility_location: impl must be 'torch' or 'triton', got {impl!r}")
    return greedy(similarity(x), k)


def greedy(sim: torch.Tensor, k: int) -> torch.Tensor:
    """The greedy of facility_location on a precomputed similarity (B, n, n) fp32 -> (B, k) int64."""
    n = sim.shape[-1]
    batch = torch.arange(sim.shape[0], device=sim.device)
    picked = torch.zeros(sim.shape[0], n, dtype=torch.bool, device=sim.device)
    first = _first_best(sim.sum(-1))
    order = [first]
    picked[batch, first] = True
    cover = sim[batch, first]                                  # (B, n): best similarity so far per token
    for _ in range(1, k):
        gain = (sim - cover.unsqueeze(1)).clamp_min(0).sum(-1)
        gain = gain.masked_fill(picked, float("-inf"))
        nxt = _first_best(gain)
        order.append(nxt)
        picked[batch, nxt] = True
        cover = torch.maximum(cover, sim[batch, nxt])
    return torch.stack(order, dim=-1)


def _triton(x: torch.Tensor, k: int) -> torch.Tensor:
    import os

    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError("facility_location(impl='triton') needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
    try:
        from ..plugins.select_kernel import launch
    except ImportError as err:
        raise UsageError(f"facility_location(impl='triton') needs triton: pip install triton ({err})") from None
    return launch(x, k, TIE_TOL)


def _first_best(score: torch.Tensor) -> torch.Tensor:
    """Lowest index whose score is within TIE_TOL of the maximum, per row."""
    near = score >= score.max(-1, keepdim=True).values - TIE_TOL
    return near.to(torch.uint8).argmax(-1)                    # argmax returns the first maximum


# The selection as one graph op (the custom-op contract): domain `toma`, op_type = TensorRT plugin name.
# Inputs: tiles (B, T, n, C) float, previous destinations (B, T, d) int64, recompute (int32 of shape [1]:
# TensorRT plugins take no bool tensors); output: destinations (B, T, d) int64, recomputed from the tiles or
# passed through. Attributes: plugin_namespace and plugin_version (which TensorRT's parser matches against
# the registered plugin), num_dst and tie_tol (which it hands to the plugin).
OP_DOMAIN = "toma"
OP_NAME = "ToMASelect"
OP_VERSION = 1


def recompute_flag(recompute: bool, device=None) -> torch.Tensor:
    """The graph's recompute input: int32 [1], 1 to select anew, 0 to reuse the previous destinations."""
    return torch.tensor([int(bool(recompute))], dtype=torch.int32, device=device)


def select_or_reuse(tiles: torch.Tensor, previous: torch.Tensor, recompute: torch.Tensor,
                    sim: torch.Tensor | None = None) -> torch.Tensor:
    """Destinations per tile: greedy on `tiles` when `recompute` is true, else `previous` unchanged.

    Inside torch.onnx.export this becomes the single `toma::ToMASelect` node (its portable body is attached
    after export by toma_export.onnx); in eager mode it runs the reference greedy, on `sim` (the tiles'
    similarity, (B, T, n, n)) when the caller has it already.
    """
    b, t, n, c = tiles.shape
    d = previous.shape[-1]
    if torch.onnx.is_in_onnx_export():
        attrs = dict(plugin_namespace=OP_DOMAIN, plugin_version=str(OP_VERSION), num_dst=d, tie_tol=TIE_TOL)
        out = torch.onnx.ops.symbolic(f"{OP_DOMAIN}::{OP_NAME}", (tiles, previous, recompute), attrs,
                                      dtype=torch.int64, shape=previous.shape, version=OP_VERSION)
        return out.to(previous.device)     # made on the default device; a trace on meta weights needs meta
    if not bool(recompute.reshape(-1)[0]):
        return previous
    if sim is None:
        return facility_location(tiles.reshape(b * t, n, c), d).reshape(b, t, d)
    return greedy(sim.reshape(b * t, n, n), d).reshape(b, t, d)
