"""ToMAGraph: a patched network as the exported graph computes it.

Inputs are the spec's network inputs, then per merged group the previous destinations
`toma_dst.<group>` (B, H/(f*th), W/(f*tw), d) and one `toma_recompute` flag (int32 [1]); outputs are the
network output then `toma_dst_out.<group>`, the destinations used. The caller owns the schedule: recompute=1
on steps that refresh (the previous destinations are ignored), 0 to reuse them. Running this module
in eager PyTorch with the same destinations is the reference every backend is compared against.

With `part` it is one of the graphs First-Block Cache splits the network into (the spec's `parts`: FLUX's head and
tail), with that part's inputs and outputs; ToMA lives in the tail.
"""
from __future__ import annotations

import torch

from ..models import ModelSpec
from ..toma.patch import PatchReport, toma_state
from ..toma.selection import recompute_flag
from ..toma.state import GraphDestinations
from ..toma.tiles import destinations_per_tile

RECOMPUTE = "toma_recompute"


def dst_input(group: str) -> str:
    return f"toma_dst.{group}"


def dst_output(group: str) -> str:
    return f"toma_dst_out.{group}"


class ToMAGraph(torch.nn.Module):
    """report=None wraps the unpatched network with the same layout (the baseline: no ToMA inputs)."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, report: PatchReport | None, part: str | None = None):
        super().__init__()
        self.model, self.spec, self.report, self.part = model, spec, report, part
        self.groups = list(report.groups) if report else []
        self.net_names = list(self.net_axes())
        self.last_tiles: dict = {}

    def net_axes(self) -> dict:
        """The network inputs' axes (input_axes notation): the whole network's, or the part's."""
        return self.spec.input_axes() if self.part is None else self.spec.part_axes(self.part)

    def net_inputs(self, whole: dict) -> dict:
        """Sample network inputs of this graph from the whole network's (`spec.graph_inputs`)."""
        return whole if self.part is None else self.spec.part_inputs(self.part, whole)

    @property
    def input_names(self) -> list[str]:
        toma = [dst_input(g) for g in self.groups] + [RECOMPUTE] if self.report else []
        return self.net_names + toma

    @property
    def output_names(self) -> list[str]:
        own = self.spec.output_names() if self.part is None else self.spec.part_outputs(self.part)
        return own + [dst_output(g) for g in self.groups]

    def _call(self, *net: torch.Tensor) -> tuple:
        if self.part is None:
            out = self.spec.graph_call(self.model, *net)
            return out if isinstance(out, tuple) else (out,)
        return tuple(self.spec.part_call(self.part, self.model, *net))

    def forward(self, *inputs: torch.Tensor):
        if self.report is None:
            return self._call(*inputs)
        k = len(self.net_names)
        net, previous, recompute = inputs[:k], inputs[k:-1], inputs[-1]
        state = toma_state(self.model)
        state.graph = GraphDestinations(dict(zip(self.groups, previous)), recompute)
        if self.spec.grid_is_input:              # (B, H, W, C): the grid is the input's (H, W)
            for g in self.groups:
                state.grids[g] = tuple(net[0].shape[1:3])
        try:
            out = self._call(*net)
            used = state.graph.used
            self.last_tiles = state.graph.tiles     # eager callers (parity) read the selection features
        finally:
            state.graph = None
        return (*out, *[used[g] for g in self.groups])

    # -- shapes of the ToMA inputs, in the spec's axis notation --
    def toma_axes(self) -> dict:
        if self.report is None:
            return {}
        th, tw = self.report.config.tile
        return {dst_input(g): {0: ("batch", 1), 1: ("height", f * th), 2: ("width", f * tw)}
                for g, f in self.report.downsample.items()}

    def sample_toma_inputs(self, net_inputs: dict, recompute: bool = True) -> dict:
        """Zero previous destinations (ignored when recompute is true) for given network inputs."""
        if self.report is None:
            return {}
        shapes = self.toma_shapes(*call_grid(self.spec, net_inputs, self.net_axes()))
        out = {name: torch.zeros(shape, dtype=torch.int64) for name, shape in shapes.items()}
        out[RECOMPUTE] = recompute_flag(recompute)
        return out

    def toma_shapes(self, batch: int, height_cells: int, width_cells: int) -> dict:
        if self.report is None:
            return {}
        c = self.report.config
        return dst_shapes(c.tile, destinations_per_tile(c.tile, c.ratio), self.report.downsample, batch,
                          height_cells, width_cells)


def call_grid(spec: ModelSpec, net_inputs: dict, axes: dict | None = None) -> tuple[int, int, int]:
    """(batch, height cells, width cells) of one call, read off its first network input (`axes`: the graph's
    input axes, the whole network's by default)."""
    axes = axes or spec.input_axes()
    first = next(iter(axes))
    shape = net_inputs[first].shape
    axis = {symbol: a for a, (symbol, _) in axes[first].items()}
    return shape[axis["batch"]], shape[axis["height"]], shape[axis["width"]]


def dst_shapes(tile, d: int, downsample: dict, batch: int, height_cells: int, width_cells: int) -> dict:
    """{toma_dst.<group>: (B, H/(f*th), W/(f*tw), d)} for a graph input of H x W cells, f being each merged
    group's down-sampling: the shapes `toma_axes` declares, for callers that have only the metadata."""
    th, tw = tile
    return {dst_input(g): (batch, height_cells // (f * th), width_cells // (f * tw), d) for g, f in downsample.items()}
