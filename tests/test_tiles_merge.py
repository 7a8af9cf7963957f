import pytest
import torch

from toma_export.toma import TileMerge, fold, unfold
from toma_export.toma.tiles import check_tiling, destinations_per_tile


@pytest.mark.parametrize("grid,tile", [((8, 8), (4, 4)), ((6, 12), (3, 4)), ((16, 8), (2, 8)), ((5, 7), (1, 1))])
def test_fold_then_unfold_is_identity(grid, tile):
    x = torch.randn(3, grid[0] * grid[1], 5)
    tiles = fold(x, grid, tile)
    assert tiles.shape == (3, (grid[0] // tile[0]) * (grid[1] // tile[1]), tile[0] * tile[1], 5)
    assert torch.equal(unfold(tiles, grid, tile), x)


def test_fold_order_is_the_official_tile_order():
    h, w, th, tw = 8, 12, 2, 4
    idx = torch.arange(h * w).reshape(1, -1, 1)
    tiles = fold(idx, (h, w), (th, tw))[0, :, :, 0]
    for t in range(tiles.shape[0]):
        ty, tx = divmod(t, w // tw)
        for i in range(th * tw):
            py, px = divmod(i, tw)
            assert tiles[t, i] == (ty * th + py) * w + tx * tw + px


def test_tile_must_divide_grid():
    check_tiling((64, 48), (4, 4))
    with pytest.raises(ValueError, match=r"tile 4x4 does not divide the 30x32 token grid.*tile=\(3, 4\)"):
        check_tiling((30, 32), (4, 4))


@pytest.mark.parametrize("ratio,want", [(0.0, 16), (0.25, 12), (0.5, 8), (0.75, 4), (0.99, 1)])
def test_destinations_per_tile(ratio, want):
    assert destinations_per_tile((4, 4), ratio) == want


def clustered(b, grid, tile, d, c=8, seed=0):
    """Each tile holds d distinct directions, every token a copy of one of them (a hard assignment)."""
    g = torch.Generator().manual_seed(seed)
    n, t = tile[0] * tile[1], (grid[0] // tile[0]) * (grid[1] // tile[1])
    centres = torch.randn(b, t, d, c, generator=g)
    owner = torch.cat([torch.arange(d), torch.randint(0, d, (n - d,), generator=g)])
    tiles = centres[:, :, owner] * (1 + torch.rand(b, t, n, 1, generator=g))   # scaled copies: same direction
    return unfold(tiles, grid, tile)


def test_hard_assignment_makes_merge_times_unmerge_identity():
    grid, tile = (8, 8), (4, 4)
    x = clustered(2, grid, tile, d=8)
    m = TileMerge.compute(x, grid, tile, ratio=0.5, scale=1000.0)
    eye = torch.eye(8).expand(2, 4, 8, 8)
    torch.testing.assert_close(m.merge_w @ m.unmerge_w, eye, atol=1e-5, rtol=0)
    # unmerge(merge(x)) reproduces x up to the per-token scale: every token sits on its destination's line
    y = m.unmerge(m.merge(x))
    cos = torch.nn.functional.cosine_similarity(y, x, dim=-1)
    assert cos.min() > 0.9999


def test_weights_are_stochastic_and_unmerge_commutes_with_affine_layers():
    grid, tile = (8, 12), (4, 4)
    x = torch.randn(2, 96, 16)
    m = TileMerge.compute(x, grid, tile, ratio=0.5, scale=30.0)   # soft weights: the identity is not trivial
    torch.testing.assert_close(m.merge_w.sum(-1), torch.ones(2, 6, 8))
    torch.testing.assert_close(m.unmerge_w.sum(-1), torch.ones(2, 6, 16))
    layer = torch.nn.Linear(16, 7)
    z = m.merge(x)
    assert z.shape == (2, 48, 16)
    torch.testing.assert_close(m.unmerge(layer(z)), layer(m.unmerge(z)), atol=1e-5, rtol=1e-5)


def test_take_returns_each_destinations_own_row():
    grid, tile = (4, 8), (2, 4)
    x = torch.randn(3, 32, 4)
    m = TileMerge.compute(x, grid, tile, ratio=0.5, scale=1000.0)
    pos = torch.arange(32.0).reshape(1, 32, 1)
    taken = m.take(pos)[..., 0].long()                       # (B, T*d) raster positions of destinations
    tiles = fold(pos.expand(3, -1, -1), grid, tile)[..., 0].long()
    want = tiles.gather(2, m.dst).flatten(1)
    assert torch.equal(taken, want)
    # a destination is assigned to itself (self-similarity 1 beats the rest at scale 1000)
    own = m.unmerge_w.gather(2, m.dst.unsqueeze(-1).expand(-1, -1, -1, m.dst.shape[-1]))
    torch.testing.assert_close(own, torch.eye(4).expand(3, 4, 4, 4), atol=1e-4, rtol=0)


def test_given_destinations_are_kept():
    grid, tile = (4, 4), (4, 4)
    x = torch.randn(2, 16, 4)
    dst = torch.tensor([[[3, 1, 0, 2]], [[15, 14, 13, 12]]])
    m = TileMerge.compute(x, grid, tile, ratio=0.75, scale=1000.0, dst=dst)
    assert torch.equal(m.dst, dst)


def test_tile_order_merge_equals_the_raster_one():
    """merge/unmerge on tokens already in tile order (tiled=True, no layout copy) give the same numbers as
    from raster order, and the similarity computed once for selection and weights picks what the greedy on
    the features picks."""
    from toma_export.toma import facility_location
    from toma_export.toma.selection import similarity

    torch.manual_seed(0)
    grid, tile = (8, 12), (4, 4)
    x = torch.randn(2, 96, 24)
    raster = TileMerge.compute(x, grid, tile, 0.5, 1000.0)
    tiled_x = fold(x, grid, tile).flatten(1, 2)
    tiled = TileMerge.compute(tiled_x, grid, tile, 0.5, 1000.0, tiled=True)
    assert torch.equal(raster.dst, tiled.dst)
    assert torch.equal(raster.dst, facility_location(fold(x, grid, tile).flatten(0, 1), 8).reshape(2, 6, 8))
    y = tiled.merge(tiled_x, tiled=True)
    torch.testing.assert_close(y, raster.merge(x), rtol=0, atol=0)
    back = tiled.unmerge(y, tiled=True)
    torch.testing.assert_close(unfold(back.unflatten(1, (6, 16)), grid, tile), raster.unmerge(y), rtol=0, atol=0)
    cos = torch.nn.functional.cosine_similarity(x[:, :, None], x[:, None], dim=-1)
    torch.testing.assert_close(similarity(x), cos, rtol=0, atol=1e-6)
