"""`toma-export validate --cache`: the served First-Block Cache loop, step by step, against the PyTorch network with
diffusers' own hook.

The reference is the fp32 PyTorch network with ToMA patched and then diffusers' FirstBlockCache hook; the candidate
is the exported head and tail on ONNX Runtime, run by the served network (serve/network.py) with the same rule.
Both get the reference loop's inputs at every step (teacher forcing), and a computed step's tail gets the
reference's ToMA destinations, as `validate` forces them: a near-tie in the greedy selection, where rounding picks
another token of a tile, would otherwise fail a step (and the cached steps that reuse it) with nothing wrong.
The exported selection itself is judged by `validate` without --cache. So each step's decision and output compare
on their own: a decision may differ where backend rounding puts the relative change on the other side of the
threshold (allowed once), and a step where both decided alike must match within the step tolerance.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from .. import models
from ..cache import CacheConfig, TorchCache, check_family
from ..errors import UsageError
from ..toma import ToMAConfig, apply_toma
from .metrics import compare, tolerance


def validate_cache(model: str, config: ToMAConfig | None, cache: CacheConfig, steps: int = 28, size=None,
                   output_dir=None, rtol: float | None = None, atol: float | None = None, seed: int = 0,
                   progress=None) -> dict:
    """Per step: both decisions, and the output compared where they agree. Passed when at most one decision differs
    and every agreeing step is within tolerance."""
    from ..onnx import ExportOptions, export_in_child
    from ..onnx.export import export_split
    from ..resources import default_output
    from ..serve.network import load_network

    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    spec = models.get(model)
    check_family(cache, spec)
    if steps < 2:
        raise UsageError(f"validate --cache needs a loop of at least 2 steps (--steps), got {steps}")
    height, width = spec.size(*(size or (None, None)))
    out = Path(output_dir or default_output()) / "onnx"
    tail = export_split(model, config, out, ExportOptions(height=height, width=width, batch=1), progress=progress,
                        make=export_in_child)
    served = load_network(tail["onnx"], cache=cache)
    progress(f"[validate] PyTorch fp32 reference with diffusers' FirstBlockCache (threshold {cache.threshold:g}) "
             f"against the head and tail on ONNX Runtime, {steps} steps at {height}x{width} px")
    network = spec.load(torch.float32)
    if config is not None:
        apply_toma(network, config)
    hook = TorchCache(network, cache)
    step_atol, step_rtol = tolerance("step", "fp32", atol, rtol)
    rows = []

    def step(i: int, kwargs: dict) -> torch.Tensor:
        """Both networks on the reference loop's inputs; the loop goes on with the reference."""
        reference = network(**kwargs, return_dict=False)[0]
        served.schedule.force(destinations_used(network))
        candidate = served(**kwargs, return_dict=False)[0]
        served.schedule.force(None)              # a step the served head skips leaves nothing pending
        ran, decided = hook.decisions[-1], served.cache.decisions[-1]
        row = dict(step=i, diffusers="compute" if ran else "cache", served="compute" if decided[2] else "cache",
                   relative_change=decided[3])
        if ran == decided[2]:
            row.update(compare(reference, candidate, step_atol, step_rtol))
        rows.append(row)
        return reference

    served.reset()
    with torch.no_grad(), network.cache_context("cond"):
        spec.denoise(spec.sample_inputs(1, height, width, seed, smooth=True), steps, step)
    differ = [r["step"] for r in rows if r["diffusers"] != r["served"]]
    failed = [r["step"] for r in rows if "passed" in r and not r["passed"]]
    return dict(model=spec.name, cache=str(cache), toma=config is not None, height=height, width=width, steps=steps,
                tail=tail["onnx"], computed=dict(diffusers=hook.computed, served=served.cache.computed),
                differing_decisions=differ, failed_steps=failed, rows=rows,
                passed=len(differ) <= 1 and not failed)


def destinations_used(network) -> dict | None:
    """{group: destinations} the patched PyTorch network selected in its last call; None where it merged nothing
    then (ToMA off, or a step the cache skipped)."""
    state = getattr(network, "_toma", None)
    if state is None:
        return None
    used = {group: cached.merge.dst for (group, call), cached in state.cache.items()
            if call == state.call and cached.step == state.step}
    return used or None


def table(report: dict) -> str:
    """The decisions side by side, one line per step."""
    lines = [f"{report['model']} {report['cache']}{' with ToMA' if report['toma'] else ''}, {report['steps']} steps at "
             f"{report['height']}x{report['width']} px: PyTorch + diffusers' hook vs the served head/tail on ONNX "
             "Runtime (the reference's ToMA destinations forced)",
             f"  {'step':>4}  {'diffusers':>9}  {'served':>7}  {'change':>7}  {'max abs err':>11}  verdict"]
    for r in report["rows"]:
        change = "-" if r["relative_change"] is None else f"{r['relative_change']:.4f}"
        err = f"{r['max_abs']:.2e}" if "max_abs" in r else "-"
        verdict = ("ok" if r.get("passed") else "FAIL") if "passed" in r else "decisions differ"
        lines.append(f"  {r['step']:>4}  {r['diffusers']:>9}  {r['served']:>7}  {change:>7}  {err:>11}  {verdict}")
    c = report["computed"]
    lines.append(f"  computed steps: diffusers {c['diffusers']}, served {c['served']} of {report['steps']}; "
                 f"{'PASSED' if report['passed'] else 'FAILED'}")
    return "\n".join(lines)
