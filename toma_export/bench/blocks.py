"""The blocks the benchmark times, at real token counts: one SDXL transformer block of the 64x64 level and
one FLUX single-stream block (4096 image + 512 text tokens).

Each variant is a small nn.Module with tensor inputs only, so the same object runs eagerly in PyTorch and
exports to ONNX: the baseline block, the block with the real ToMA patch swapped in (selection on every
call, through the same `select_or_reuse` the model exports use), the merge machinery alone (to measure
ToMA's overhead), and tomesd's patch on the same SDXL block.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from .. import families
from ..errors import UsageError
from ..toma import ToMAConfig
from ..toma.merge import TileMerge, merge_weights
from ..toma.patch import _swapped
from ..toma.selection import select_or_reuse, similarity
from ..toma.state import GraphDestinations, ToMAState
from ..toma.tiles import destinations_per_tile, fold, unfold

GROUP = "block"


@dataclass
class BlockCase:
    """One benchmarked block: how to build it, its inputs, and how ToMA patches it."""

    name: str
    description: str
    block: torch.nn.Module
    inputs: dict                 # name -> tensor, in forward order
    grid: tuple[int, int]        # image-token grid ToMA tiles
    mixin: type                  # the ToMA patch class swapped in front of the block's class
    merge_pairs: int             # merge/unmerge pairs per call with the default sublayers
    extra: dict                  # constant per-call tensors the forward needs besides inputs (RoPE tables)
    call: Callable               # call(block, net holding `extra` as buffers, *inputs) -> one output tensor

    def baseline(self) -> torch.nn.Module:
        return _Net(self, copy.deepcopy(self.block))

    def toma(self, config: ToMAConfig) -> torch.nn.Module:
        return _ToMANet(self, copy.deepcopy(self.block), config)

    def overhead(self, config: ToMAConfig) -> torch.nn.Module:
        return _MergeOnly(self, config)


def sdxl_block(grid: int = 64, seed: int = 0) -> BlockCase:
    """SDXL's 64x64-level BasicTransformerBlock (the family's bench block)."""
    return BlockCase(**families.sdxl.bench_block(grid=grid, seed=seed))


def flux_single_block(width: int = families.flux.FLUX_WIDTH, grid: int = 64, text: int = 512,
                      seed: int = 0) -> BlockCase:
    """A FLUX single-stream block at 1024x1024 px token counts (the family's bench block)."""
    return BlockCase(**families.flux.bench_block(width=width, grid=grid, text=text, seed=seed))


class _Net(torch.nn.Module):
    """The block as a function of its input tensors (SDXL: hidden, context; FLUX: image, text, temb)."""

    def __init__(self, case: BlockCase, block: torch.nn.Module):
        super().__init__()
        self.block, self.call = block, case.call
        for name, tensor in case.extra.items():
            self.register_buffer(name, tensor, persistent=False)

    def forward(self, *inputs):
        return self.call(self.block, self, *inputs)


class _ToMANet(_Net):
    """The block with ToMA's patch class swapped in; destinations are selected on every call (the worst case:
    a served model reuses them across blocks and steps), via the graph path the model exports use."""

    def __init__(self, case: BlockCase, block: torch.nn.Module, config: ToMAConfig):
        super().__init__(case, block)
        self.state = ToMAState(config)
        self.state.grids[GROUP] = case.grid
        block.__class__ = _swapped(case.mixin, type(block))
        block._toma, block._toma_group = self.state, GROUP
        th, tw = config.tile
        self.dst_shape = (case.grid[0] // th, case.grid[1] // tw, destinations_per_tile(config.tile, config.ratio))

    def forward(self, *inputs):
        previous = torch.zeros((inputs[0].shape[0], *self.dst_shape), dtype=torch.int64, device=inputs[0].device)
        self.state.graph = GraphDestinations({GROUP: previous}, torch.tensor(True))
        try:
            return super().forward(*inputs)
        finally:
            self.state.graph = None


class _MergeOnly(torch.nn.Module):
    """What ToMA adds to a block, without the block, in the order the patched block runs it: the tile layout
    copy in, one similarity shared by selection and merge weights, as many merge -> unmerge round trips as
    the block makes (chained in tile order, so no runtime can fold them away), and the layout copy out."""

    def __init__(self, case: BlockCase, config: ToMAConfig):
        super().__init__()
        self.grid, self.config, self.pairs = case.grid, config, case.merge_pairs
        self.d = destinations_per_tile(config.tile, config.ratio)

    def forward(self, hidden, *_unused):
        c = self.config
        tiles = fold(hidden, self.grid, c.tile)
        sim = similarity(tiles)
        previous = torch.zeros((tiles.shape[0], tiles.shape[1], self.d), dtype=torch.int64, device=hidden.device)
        merge = TileMerge.from_similarity(sim, self.grid, c.tile, c.scale,
                                          select_or_reuse(tiles, previous, torch.tensor(True), sim))
        out = tiles.flatten(1, 2)
        for _ in range(self.pairs):
            out = merge.unmerge(merge.merge(out, tiled=True), tiled=True)
        return unfold(out.unflatten(1, (-1, tiles.shape[2])), self.grid, c.tile)


# -- the overhead's parts, each a module of its own so that every backend times it alone --
class _Fold(torch.nn.Module):
    def __init__(self, grid, tile):
        super().__init__()
        self.grid, self.tile = grid, tile

    def forward(self, hidden):
        return fold(hidden, self.grid, self.tile)


class _Unfold(_Fold):
    def forward(self, tiles):
        return unfold(tiles, self.grid, self.tile)


class _Similarity(torch.nn.Module):
    def forward(self, tiles):
        return similarity(tiles)


class _Select(torch.nn.Module):
    """The selection as the backend runs it: the exported `toma::ToMASelect` (similarity included)."""

    def forward(self, tiles, previous):
        return select_or_reuse(tiles, previous, torch.tensor(True))


class _Weights(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, sim, dst):
        return merge_weights(sim, dst, self.scale)


class _Apply(torch.nn.Module):
    """One merge (d x n weights) or unmerge (n x d) of every tile: a batched product in tile order."""

    def forward(self, weights, x):
        return weights.to(x.dtype) @ x


# what ToMA runs, part by part, and how many times per call of the block (`pairs` = merge_pairs)
PARTS = ("fold", "similarity", "selection", "weights", "merge", "unmerge", "unfold")


def parts(case: BlockCase, config: ToMAConfig, device="cpu", dtype=torch.float32) -> dict:
    """{part: (module, inputs)} at the block's real sizes, inputs made by running the parts before it.
    `similarity` is also inside `selection` (the op computes its own), so the sum counts it once."""
    hidden = case.inputs[next(iter(case.inputs))].to(device, dtype)
    tiles = fold(hidden, case.grid, config.tile)
    b, t = tiles.shape[:2]
    d = destinations_per_tile(config.tile, config.ratio)
    previous = torch.zeros((b, t, d), dtype=torch.int64, device=device)
    sim = similarity(tiles)
    dst = select_or_reuse(tiles, previous, torch.tensor(True), sim)
    merge_w, unmerge_w = merge_weights(sim, dst, config.scale)
    apply = _Apply()
    merged = apply(merge_w, tiles)
    return dict(fold=(_Fold(case.grid, config.tile), (hidden,)), similarity=(_Similarity(), (tiles,)),
                selection=(_Select(), (tiles, previous)), weights=(_Weights(config.scale), (sim, dst)),
                merge=(apply, (merge_w, tiles)), unmerge=(apply, (unmerge_w, merged)),
                unfold=(_Unfold(case.grid, config.tile), (apply(unmerge_w, merged),)))


def parts_total(ms: dict, pairs: int) -> float:
    """ToMA's cost per block call from its parts: layout in and out once, selection (with the similarity)
    and weights once, and `pairs` merge/unmerge round trips."""
    return ms["fold"] + ms["selection"] + ms["weights"] + pairs * (ms["merge"] + ms["unmerge"]) + ms["unfold"]


def tomesd_supports(case: BlockCase) -> bool:
    """tomesd patches diffusers' UNet BasicTransformerBlock only."""
    return type(getattr(case, "block", None)).__name__ == "BasicTransformerBlock"


def tomesd_net(case: BlockCase, **kwargs) -> torch.nn.Module:
    """tomesd's patch (its defaults unless kwargs say otherwise) on a copy of the SDXL block.

    tomesd sizes its merge from the latent the UNet receives; here the block is the model, so its size is
    set to the block's own grid: the 64x64 level counts as tomesd's top level (downsample 1), which its
    default max_downsample=1 merges. (In a real SDXL UNet that level is downsample 2 and the defaults
    merge nothing.)"""
    import tomesd
    from diffusers import ModelMixin

    if not tomesd_supports(case):
        raise UsageError("tomesd patches UNet BasicTransformerBlocks only; it has no FLUX support")
    host = ModelMixin()               # tomesd.apply_patch looks for 'ModelMixin' among the class names
    host.block = copy.deepcopy(case.block)
    tomesd.apply_patch(host, **kwargs)
    for hook in host._tome_info["hooks"]:
        hook.remove()
    host._tome_info["hooks"] = []
    host._tome_info["size"] = case.grid
    return _Net(case, host.block)


def tomesd_overhead(case: BlockCase, net: torch.nn.Module):
    """A callable running tomesd's own matching and its merge/unmerge of the self-attention input (what its
    defaults merge) on the block's input: tomesd's overhead, measured like ToMA's."""
    from tomesd.patch import compute_merge

    info, x = net.block._tome_info, case.inputs["hidden_states"]

    def run():
        m_a, _, _, u_a, _, _ = compute_merge(x, info)
        return u_a(m_a(x))

    return run
