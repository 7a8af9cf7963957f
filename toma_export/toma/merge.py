"""Merge and unmerge inside tiles: the attention-like linear maps of ToMA.

Per tile, with X̂ the L2-normalised tokens and X̂_D the destination rows:
    A = softmax(scale * X̂_D X̂ᵀ, over destinations)   (d, n): each token's soft assignment
    merge   M = A / rowsum(A)                           (d, n): weighted mean of a destination's tokens
    unmerge U = Aᵀ                                      (n, d): each token takes its destinations' outputs
With a hard assignment M·Aᵀ = I, so U = Aᵀ is the pseudo-inverse of M. Columns of A sum to one, so U commutes
with any affine layer applied per token: unmerge(layer(z)) == layer(unmerge(z)).
Weights are computed in fp32 (scale 1000 on cosines would lose the assignment in bf16) and cast to the
activations' dtype when applied.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .selection import facility_location
from .tiles import destinations_per_tile, fold, unfold


@dataclass
class TileMerge:
    """Destinations and merge/unmerge weights of one group, for one token grid and batch."""

    grid: tuple[int, int]
    tile: tuple[int, int]
    dst: torch.Tensor        # (B, T, d) int64 indices inside each tile, greedy order
    merge_w: torch.Tensor    # (B, T, d, n) fp32
    unmerge_w: torch.Tensor  # (B, T, n, d) fp32

    @classmethod
    def compute(cls, x, grid, tile, ratio: float, scale: float, dst: torch.Tensor | None = None) -> "TileMerge":
        """Select destinations (unless given) and derive the weights from features x (B, H*W, C)."""
        tiles = fold(x, grid, tile)
        b, t, n, c = tiles.shape
        if dst is None:
            d = destinations_per_tile(tile, ratio)
            dst = facility_location(tiles.reshape(b * t, n, c), d).reshape(b, t, d)
        return cls.from_tiles(tiles, grid, tile, scale, dst)

    @classmethod
    def from_tiles(cls, tiles, grid, tile, scale: float, dst: torch.Tensor) -> "TileMerge":
        """The weights for given destinations from features already folded into tiles (B, T, n, C)."""
        merge_w, unmerge_w = merge_weights(tiles, dst, scale)
        return cls(tuple(grid), tuple(tile), dst, merge_w, unmerge_w)

    @property
    def batch(self) -> int:
        return self.dst.shape[0]

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H*W, C) -> (B, T*d, C)."""
        y = self.merge_w.to(x.dtype) @ fold(x, self.grid, self.tile)
        return y.flatten(1, 2)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, T*d, C) -> (B, H*W, C)."""
        b, t, d = self.dst.shape
        z = self.unmerge_w.to(y.dtype) @ y.reshape(b, t, d, y.shape[-1])
        return unfold(z, self.grid, self.tile)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The destinations' own rows of per-token data, (B or 1, H*W, C) -> (B, T*d, C); e.g. RoPE angles."""
        tiles = fold(x.expand(self.batch, -1, -1), self.grid, self.tile)
        idx = self.dst.unsqueeze(-1).expand(-1, -1, -1, tiles.shape[-1])
        return tiles.gather(2, idx).flatten(1, 2)


def merge_weights(tiles: torch.Tensor, dst: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge (B,T,d,n) and unmerge (B,T,n,d) weights from tiles (B,T,n,C) and destinations (B,T,d)."""
    # Cosines from the Gram matrix of each tile: normalising n x n entries instead of n x C features, and
    # gathering d of n rows instead of d feature vectors, keeps the work off the wide channel axis (it
    # halves ToMA's overhead in ONNX Runtime); the result equals cos(x_d, x_j) up to rounding.
    x = tiles.float()
    gram = x @ x.transpose(-1, -2)                                       # (B, T, n, n)
    norm = gram.diagonal(dim1=-2, dim2=-1).clamp_min(1e-24).sqrt()      # |x| (F.normalize's eps is 1e-12)
    cos = gram / (norm.unsqueeze(-1) * norm.unsqueeze(-2))
    rows = cos.gather(2, dst.unsqueeze(-1).expand(-1, -1, -1, cos.shape[-1]))   # (B, T, d, n)
    a = torch.softmax(scale * rows, dim=-2)
    return a / a.sum(-1, keepdim=True), a.transpose(-1, -2)
