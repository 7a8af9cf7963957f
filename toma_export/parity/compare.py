"""Candidates against the reference record: one step with the reference's destinations forced, each
candidate's own selection judged by its facility-location objective, a whole loop, and what merging itself
costs (the reference loop without ToMA)."""
from __future__ import annotations

import numpy as np
import torch

from ..onnx import ToMAGraph
from ..quantize import disabled
from ..onnx.graph import RECOMPUTE, dst_output
from ..toma import apply_toma, remove_toma
from .metrics import compare, selection_agreement, tolerance
from .record import cast_feeds, forced_feeds, run_loop
from .runners import TorchRunner

MIN_OBJECTIVE_RATIO = 0.999   # a candidate's own picks may differ on near-ties, not cover the tile worse


def _entry(kind, backend, size, step, output, ref, cand, options) -> dict:
    atol, rtol = tolerance(kind, options.dtype, options.atol, options.rtol, _mode(options))
    stats = compare(ref, cand, atol, rtol)
    ref_bad = int((~np.isfinite(np.asarray(ref, dtype=np.float64))).sum())
    if ref_bad:                      # NaN/Inf in the reference: the inputs are bad, not the candidate
        stats.update(passed=False, reference_nonfinite=ref_bad)
    return dict(kind=kind, backends=["torch-fp32", backend], size=f"{size[0]}x{size[1]}", step=step, output=output,
                **stats)


def _mode(options) -> str | None:
    quant = getattr(options, "quant", None)
    return quant.mode if quant else None


def compare_step(record: dict, candidates: dict, options, size) -> list:
    """One forward: every candidate gets the reference's destinations (recompute off)."""
    ref = record["step"]
    out_name = next(iter(ref))
    forced = forced_feeds(record["feeds"], ref)
    entries = []
    for name, runner in candidates.items():
        out = runner.infer(cast_feeds(forced, options.dtype, runner), check_inputs=False)
        entries.append(_entry("step", name, size, 0, out_name, ref[out_name], out[out_name], options))
    return entries


def bisect_step(reference, onnx_path, record, options, size, step_entries) -> list:
    from .bisect import bisect

    failed = [e for e in step_entries if not e["passed"] and e["backends"][1] == "onnxruntime"]
    if not failed or onnx_path is None:
        return []
    _, rtol = tolerance("step", options.dtype, options.atol, options.rtol, _mode(options))
    feeds = cast_feeds(forced_feeds(record["feeds"], record["step"]), options.dtype, None)
    result = bisect(reference, onnx_path, feeds, rtol)
    return [dict(result, backend="onnxruntime", size=f"{size[0]}x{size[1]}")]


def selection_step(record: dict, candidates: dict, options, size) -> list:
    """Each candidate selects on its own; compare picks and objective with the reference's."""
    if RECOMPUTE not in record["feeds"]:
        return []
    entries = []
    for name, runner in candidates.items():
        out = runner.infer(cast_feeds(record["feeds"], options.dtype, runner), check_inputs=False)
        per_group = {g: selection_agreement(torch.as_tensor(t), record["step"][dst_output(g)], out[dst_output(g)])
                     for g, t in record["tiles"].items()}
        identical = float(np.mean([v["identical"] for v in per_group.values()]))
        ratio = min(v["objective_ratio"] for v in per_group.values())
        entries.append(dict(backend=name, size=f"{size[0]}x{size[1]}", identical=identical, objective_ratio=ratio,
                            min_objective_ratio=MIN_OBJECTIVE_RATIO, passed=bool(ratio >= MIN_OBJECTIVE_RATIO),
                            groups=per_group))
    return entries


def compare_loop(spec, record, candidates, options, size, config) -> list:
    entries = []
    for name, runner in candidates.items():
        latents, _ = run_loop(spec, runner, record["feeds"], options.steps, config, options.dtype,
                              forced=record["used"])
        for i, (r, c) in enumerate(zip(record["latents"], latents)):
            entries.append(_entry("loop", name, size, i, "latents", r, c, options))
    return entries


def fidelity(spec, ref_runner, record, options, size, config) -> dict:
    """What merging itself costs: the reference loop against the same loop without ToMA."""
    model = ref_runner.graph.model
    remove_toma(model)               # the same weights, unpatched for this loop (no second copy in memory)
    try:
        plain = TorchRunner(ToMAGraph(model, spec, None), name="torch-fp32-no-toma")
        with plain:
            feeds = {k: v for k, v in record["feeds"].items() if k in plain.graph.input_names}
            base, _ = run_loop(spec, plain, feeds, options.steps, None, "fp32")
    finally:
        apply_toma(model, config)
    final = compare(base[-1], record["latents"][-1], 0.0, 0.0)
    return dict(size=f"{size[0]}x{size[1]}", steps=options.steps, compared="torch ToMA vs torch without ToMA",
                max_abs=final["max_abs"], cosine=final["cosine"], relative_l2=_rel_l2(record["latents"][-1], base[-1]))


def quantization_cost(spec, ref_runner, record, options, size, config) -> dict:
    """What 8-bit itself costs: the fake-quantized reference against the same network unquantized, one step with
    the same destinations and, under --steps, the final latents of the loop. Reported, not judged."""
    name = next(iter(record["step"]))
    with disabled(ref_runner.graph.model):
        out = ref_runner.infer(forced_feeds(record["feeds"], record["step"]), check_inputs=False)
        step = compare(record["step"][name], out[name], 0.0, 0.0)
        entry = dict(size=f"{size[0]}x{size[1]}", compared="torch fake-quantized vs torch unquantized",
                     step_max_abs=step["max_abs"], step_cosine=step["cosine"],
                     step_relative_l2=_rel_l2(record["step"][name], out[name]))
        if options.steps:
            base, _ = run_loop(spec, ref_runner, record["feeds"], options.steps, config, "fp32",
                               forced=record["used"])
            final = compare(base[-1], record["latents"][-1], 0.0, 0.0)
            entry.update(steps=options.steps, loop_max_abs=final["max_abs"], loop_cosine=final["cosine"],
                         loop_relative_l2=_rel_l2(record["latents"][-1], base[-1]))
    return entry


def _rel_l2(a, b) -> float:
    """|a - b| / |b|."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
