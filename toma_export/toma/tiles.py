"""Tile layout of the latent token grid, written with reshape/permute only so that it exports to ONNX as
Reshape/Transpose (no gather or scatter).

Tokens are in raster order (index = row * W + col). Tiles are enumerated row-major over the tile grid and
tokens row-major inside a tile, which is the order of the official code's `fold_with_indices`.
"""
from __future__ import annotations

import torch

from ..errors import UsageError


def check_tiling(grid: tuple[int, int], tile: tuple[int, int]) -> None:
    """Raise a one-line error when the tile shape does not divide the token grid."""
    (h, w), (th, tw) = grid, tile
    if h % th or w % tw:
        raise UsageError(
            f"tile {th}x{tw} does not divide the {h}x{w} token grid; pick a tile whose sides divide "
            f"{h} and {w} (e.g. tile=({_divisor(h, th)}, {_divisor(w, tw)})) or a resolution that is a multiple of the tile"
        )


def _divisor(size: int, want: int) -> int:
    return max(d for d in range(1, min(size, want) + 1) if size % d == 0)


def destinations_per_tile(tile: tuple[int, int], ratio: float) -> int:
    """d = n - floor(ratio * n), at least one: how many merged tokens each tile keeps."""
    n = tile[0] * tile[1]
    return max(1, n - int(ratio * n))


def fold(x: torch.Tensor, grid: tuple[int, int], tile: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) raster tokens -> (B, T, th*tw, C) tiles."""
    (h, w), (th, tw) = grid, tile
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, h // th, th, w // tw, tw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // th) * (w // tw), th * tw, c)


def unfold(x: torch.Tensor, grid: tuple[int, int], tile: tuple[int, int]) -> torch.Tensor:
    """(B, T, th*tw, C) tiles -> (B, H*W, C) raster tokens; the inverse of `fold`."""
    (h, w), (th, tw) = grid, tile
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, h // th, w // tw, th, tw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * w, c)
