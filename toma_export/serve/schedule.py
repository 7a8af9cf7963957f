"""DestinationSchedule: which graph runs each network call, and the ToMA destinations it gets.

An exported graph leaves the schedule to its caller (toma_recompute in, toma_dst_out.* out). This object
makes the same decisions as the PyTorch patch (toma_export.toma.state), so a served pipeline matches a
patched one: the step clock is ToMAState's own (a lower timestep is the next step, an equal one another
call of the same step, a higher one a new generation), a step outside merge_steps runs unmerged, and a
merged step recomputes destinations every dst_every-th merged step, else reuses the last ones of the same
call index (true CFG run as two calls keeps one set per call). Merge weights are recomputed by the graph on
every merged call, so weights_every > 1 is not reproduced.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..onnx.graph import RECOMPUTE, dst_input, dst_output
from ..toma import ToMAConfig
from ..toma.selection import recompute_flag
from ..toma.state import ToMAState

log = logging.getLogger("toma_export")


@dataclass
class Plan:
    merge: bool           # run the ToMA graph (else the baseline)
    step: int
    call: int
    recompute: bool = False


class DestinationSchedule:
    def __init__(self, config: ToMAConfig | None, groups: list[str]):
        self.config, self.groups = config, list(groups)
        self.clock = ToMAState(config or ToMAConfig())
        self.carried: dict = {}           # call index -> {group: destinations (int64 tensor)}
        self.forced: dict | None = None   # parity checks: the next merged call's destinations, given
        if config is not None and config.weights_every > 1:
            log.warning("ToMA weights_every=%d: exported graphs recompute merge weights on every merged call",
                        config.weights_every)

    @property
    def has_unmerged_steps(self) -> bool:
        return self.config is None or self.config.merge_steps is not None

    def reset(self) -> None:
        self.clock.reset()
        self.carried.clear()

    def plan(self, timestep) -> Plan:
        """Advance the clock for one network call and decide what runs."""
        clock = self.clock
        clock.begin_call(timestep)
        if clock.step == 0 and clock.call == 0:
            self.carried.clear()              # a new generation: nothing carries over
        if self.config is None or not self.config.merges_at(clock.step):
            return Plan(False, clock.step, clock.call)
        return Plan(True, clock.step, clock.call, recompute=self.config.refreshes_at(clock.step))

    def force(self, destinations: dict | None) -> None:
        """Parity checks: the next merged call takes these destinations ({group: indices, any shape of the right
        size}) instead of selecting, so that its output compares with the reference's on the same picks; None
        lets it select again."""
        self.forced = destinations

    def toma_feeds(self, plan: Plan, shapes: dict, device="cpu") -> dict:
        """toma_dst.<group> and toma_recompute for a merged call; `shapes` are the graph's dst shapes.
        Destinations carried with another shape (new batch or size) force a recompute."""
        if self.forced is not None:
            feeds = {dst_input(g): self.forced[g].reshape(shapes[dst_input(g)]).to(device, torch.int64)
                     for g in self.groups}
            feeds[RECOMPUTE] = recompute_flag(False, device=device)
            plan.recompute, self.forced = False, None
            return feeds
        previous = self.carried.get(plan.call)
        fresh = previous is None or any(tuple(previous[g].shape) != tuple(shapes[dst_input(g)]) for g in self.groups)
        recompute = plan.recompute or fresh
        feeds = {dst_input(g): (torch.zeros(shapes[dst_input(g)], dtype=torch.int64, device=device) if fresh
                                  else previous[g])
                 for g in self.groups}
        feeds[RECOMPUTE] = recompute_flag(recompute, device=device)
        plan.recompute = recompute
        return feeds

    def record(self, plan: Plan, outputs: dict) -> None:
        """Keep the destinations a merged call used for the next merged step of the same call index."""
        self.carried[plan.call] = {g: outputs[dst_output(g)].to(torch.int64).clone() for g in self.groups}
