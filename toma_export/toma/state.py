"""ToMAState: the one mutable object of a patched model (step clock, cached merges, token grids).

The clock advances on the network's own calls: a call whose timestep is below the previous one starts the
next denoising step, an equal timestep is another call of the same step (e.g. true CFG run as two calls,
which then get separate caches), and a larger one starts a new generation and resets everything. So a
pipeline needs no extra calls, and no step counter goes stale between images.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ToMAConfig
from .merge import TileMerge, to_tiles
from .selection import select_or_reuse, similarity
from .tiles import check_tiling


@dataclass
class _Cached:
    step: int
    merge: TileMerge


@dataclass
class GraphDestinations:
    """Destinations owned by the caller for one call, as an exported graph has them: per group the
    previous destinations (B, H/th, W/tw, d) in, one recompute flag, and the destinations used out. The
    step clock and cache are bypassed; the caller owns the schedule."""

    previous: dict
    recompute: torch.Tensor
    used: dict = field(default_factory=dict)
    merges: dict = field(default_factory=dict)
    tiles: dict = field(default_factory=dict)        # the features each group selected on (B, T, n, C)


@dataclass
class ToMAState:
    config: ToMAConfig
    step: int = 0
    call: int = 0                                    # index of the network call within the current step
    last_timestep: float | None = None
    started: bool = False                            # a call has been made since the last reset
    grids: dict = field(default_factory=dict)        # group -> (H, W) token grid of the current call
    cache: dict = field(default_factory=dict)        # (group, call) -> _Cached
    counts: dict = field(default_factory=lambda: {"select": 0, "weights": 0})
    graph: GraphDestinations | None = None           # set for calls whose destinations the caller owns

    def reset(self) -> None:
        """Forget the step clock and every cached destination: the next call is step 0 of a new image."""
        self.step, self.call, self.last_timestep, self.started = 0, 0, None, False
        self.cache.clear()
        self.grids.clear()

    def begin_call(self, timestep) -> None:
        """Advance the clock for one network call, from its timestep (None: every call is a new step)."""
        t = None if timestep is None else float(torch.as_tensor(timestep).reshape(-1)[0])
        if not self.started:
            self.started = True
        elif t is None or self.last_timestep is None or t < self.last_timestep:
            self.step, self.call = self.step + 1, 0
        elif t > self.last_timestep:
            self.reset()
            self.started = True
        else:
            self.call += 1
        self.last_timestep = t

    @property
    def merging(self) -> bool:
        return self.graph is not None or self.config.merges_at(self.step)

    def grid(self, group: str) -> tuple[int, int]:
        """The group's token grid (H, W) for this call, checked against the tile shape."""
        grid = self.grids.get(group)
        if grid is None:
            raise RuntimeError(f"ToMA: no token grid known for group {group!r}; was the model called directly?")
        check_tiling(grid, self.config.tile)
        return grid

    def merger(self, group: str, features: torch.Tensor, tiled: bool = False) -> TileMerge:
        """The group's TileMerge for this call: computed by the group's first block, reused by the rest,
        and refreshed across steps per the schedule (or when the batch or grid changed). `features` are
        (B, H*W, C) in raster order, or in tile order when `tiled`."""
        grid = self.grid(group)
        if self.graph is not None:
            return self._graph_merger(group, features, grid, tiled)
        key = (group, self.call)
        cached = self.cache.get(key)
        if cached is not None and cached.step == self.step:
            return cached.merge
        cfg = self.config
        stale = cached is None or cached.merge.grid != tuple(grid) or cached.merge.batch != features.shape[0]
        if stale or cfg.refreshes_at(self.step):
            merge = TileMerge.compute(features, grid, cfg.tile, cfg.ratio, cfg.scale, tiled=tiled)
            self.counts["select"] += 1
            self.counts["weights"] += 1
        elif cfg.reweights_at(self.step):
            merge = TileMerge.compute(features, grid, cfg.tile, cfg.ratio, cfg.scale, dst=cached.merge.dst,
                                      tiled=tiled)
            self.counts["weights"] += 1
        else:
            merge = cached.merge
        self.cache[key] = _Cached(self.step, merge)
        return merge

    def _graph_merger(self, group: str, features: torch.Tensor, grid, tiled: bool) -> TileMerge:
        g, cfg = self.graph, self.config
        if group not in g.merges:
            previous = g.previous[group]
            tiles = to_tiles(features, grid, cfg.tile, tiled)
            sim = similarity(tiles)
            dst = select_or_reuse(tiles, previous.reshape(tiles.shape[0], tiles.shape[1], previous.shape[-1]),
                                  g.recompute, sim)
            g.merges[group] = TileMerge.from_similarity(sim, grid, cfg.tile, cfg.scale, dst)
            g.used[group] = dst.reshape(previous.shape)
            g.tiles[group] = tiles
        return g.merges[group]
