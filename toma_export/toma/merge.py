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

from .selection import greedy, similarity
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
    def compute(cls, x, grid, tile, ratio: float, scale: float, dst: torch.Tensor | None = None,
                tiled: bool = False) -> "TileMerge":
        """Select destinations (unless given) and derive the weights from features x (B, H*W, C), raster
        order, or already in tile order when `tiled` (as `fold(...).flatten(1, 2)` gives them)."""
        tiles = to_tiles(x, grid, tile, tiled)
        b, t, n, _ = tiles.shape
        sim = similarity(tiles)                                      # one similarity for both
        if dst is None:
            d = destinations_per_tile(tile, ratio)
            dst = greedy(sim.reshape(b * t, n, n), d).reshape(b, t, d)
        return cls.from_similarity(sim, grid, tile, scale, dst)

    @classmethod
    def from_similarity(cls, sim, grid, tile, scale: float, dst: torch.Tensor) -> "TileMerge":
        """The weights for given destinations from the tiles' similarity (B, T, n, n)."""
        merge_w, unmerge_w = merge_weights(sim, dst, scale)
        return cls(tuple(grid), tuple(tile), dst, merge_w, unmerge_w)

    @property
    def batch(self) -> int:
        return self.dst.shape[0]

    def merge(self, x: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """(B, H*W, C) -> (B, T*d, C); `tiled`: x is in tile order already, so no layout copy is made."""
        y = self.merge_w.to(x.dtype) @ to_tiles(x, self.grid, self.tile, tiled)
        return y.flatten(1, 2)

    def unmerge(self, y: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """(B, T*d, C) -> (B, H*W, C), in raster order, or in tile order when `tiled` (no layout copy)."""
        b, t, d = self.dst.shape
        z = self.unmerge_w.to(y.dtype) @ y.reshape(b, t, d, y.shape[-1])
        return z.flatten(1, 2) if tiled else unfold(z, self.grid, self.tile)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The destinations' own rows of per-token data, (B or 1, H*W, C) -> (B, T*d, C); e.g. RoPE angles."""
        tiles = fold(x.expand(self.batch, -1, -1), self.grid, self.tile)
        idx = self.dst.unsqueeze(-1).expand(-1, -1, -1, tiles.shape[-1])
        return tiles.gather(2, idx).flatten(1, 2)


def to_tiles(x: torch.Tensor, grid, tile, tiled: bool) -> torch.Tensor:
    """(B, H*W, C) -> (B, T, n, C): a layout copy from raster order, a free reshape from tile order."""
    if not tiled:
        return fold(x, grid, tile)
    (h, w), (th, tw) = grid, tile
    return x.reshape(x.shape[0], (h // th) * (w // tw), th * tw, x.shape[-1])


def merge_weights(sim: torch.Tensor, dst: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge (B,T,d,n) and unmerge (B,T,n,d) weights from the tiles' similarity (B,T,n,n) and destinations
    (B,T,d). The unmerge weights are stored contiguous, so applying them needs no transposed product."""
    rows = sim.gather(2, dst.unsqueeze(-1).expand(-1, -1, -1, sim.shape[-1]))   # (B, T, d, n)
    a = torch.softmax(scale * rows, dim=-2)
    return a / a.sum(-1, keepdim=True), a.transpose(-1, -2).contiguous()
