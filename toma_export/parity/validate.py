"""`toma-export validate`: is an exported graph or engine as accurate as the PyTorch ToMA reference?

The fp32 PyTorch ToMA model is the reference for every candidate (ONNX Runtime on CPU computes many fp16
ops in fp32, so an fp16 run is never a reference). Downstream parity is measured with destinations forced
identical (the graphs take them as inputs); selection is judged separately, by the share of identical
picks and the candidate's facility-location objective relative to the reference's, so near-ties neither
masquerade as bugs nor hide them. A whole denoising loop with the model's real scheduler follows, because
fp16 overflow and drift show over steps, not in one. ToMA's own cost (the same loop without merging) is
reported beside it, not judged.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import models
from ..onnx import ExportOptions, ToMAGraph, export
from ..onnx.export import DTYPES
from ..onnx.graph import RECOMPUTE, dst_input, dst_output
from ..toma import ToMAConfig, apply_toma, remove_toma
from ..trt.build import DEFAULT_OUTPUT
from .metrics import compare, selection_agreement, tolerance
from .runners import EngineRunnerAdapter, TorchRunner, onnxruntime_runner

BACKENDS = ("torch", "onnxruntime", "tensorrt")
MIN_OBJECTIVE_RATIO = 0.999   # a candidate's own picks may differ on near-ties, not cover the tile worse


@dataclass(frozen=True)
class ValidateOptions:
    backends: tuple = ("torch", "onnxruntime")
    dtype: str = "fp32"
    sizes: tuple | None = None    # ((height, width), ...) pixels; None = the model's default size
    steps: int = 0                # > 0: also a whole loop of that many steps
    batch: int = 2
    atol: float | None = None
    rtol: float | None = None
    onnx: str | None = None       # an exported file (its toma.json gives the ToMA settings); None = export
    engine: str | None = None     # a built engine's engine.json; None = build one when tensorrt is asked for
    output_dir: str | None = None


def validate(model: str, config: ToMAConfig, options: ValidateOptions = ValidateOptions(), progress=None) -> dict:
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    unknown = set(options.backends) - set(BACKENDS)
    if unknown or "torch" not in options.backends:
        raise ValueError(f"backends must include torch (the reference) and come from {', '.join(BACKENDS)}; "
                         f"got {','.join(options.backends)}")
    if options.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    spec = models.get(model)
    if options.onnx:
        meta_path = Path(options.onnx).with_name("toma.json")
        if meta_path.is_file():
            toma = json.loads(meta_path.read_text())["toma"]
            config = ToMAConfig(ratio=toma["ratio"], tile=tuple(toma["tile"]), scale=toma["scale"]) if toma else None
    sizes = list(options.sizes or [spec.size(None, None)])

    progress(f"[validate] reference: {spec.name} fp32 PyTorch with ToMA")
    reference = _graph(spec, config, torch.float32)
    candidates, report = {}, dict(model=spec.name, dtype=options.dtype, toma=None, providers={}, skipped={},
                                  comparisons=[], selection=[], fidelity=[])
    report["toma"] = dict(ratio=config.ratio, tile=list(config.tile), scale=config.scale) if config else None
    if "torch" in options.backends and options.dtype != "fp32":
        candidates[f"torch-{options.dtype}"] = TorchRunner(_graph(spec, config, DTYPES[options.dtype]),
                                                           name=f"torch-{options.dtype}")
    if "onnxruntime" in options.backends:
        path = options.onnx or export(model, config, Path(options.output_dir or DEFAULT_OUTPUT) / "onnx",
                                      ExportOptions(dynamic=True, dtype=options.dtype), progress=progress)["onnx"]
        runner, provider = onnxruntime_runner(path)
        if options.dtype == "bf16" and provider == "CPUExecutionProvider":
            raise ValueError("ONNX Runtime's CPU provider has no bf16 kernels; validate bf16 with "
                             "--backends torch,tensorrt on a GPU, or export fp16/fp32 for ONNX Runtime")
        candidates["onnxruntime"] = runner
        report["providers"]["onnxruntime"] = provider
        report["onnx"] = path
    if "tensorrt" in options.backends:
        reason = _tensorrt_unavailable()
        if reason:
            report["skipped"]["tensorrt"] = reason
            progress(f"[validate] tensorrt skipped: {reason}")
        else:
            engine_json = options.engine or _build_engine(model, config, options, progress)
            candidates["tensorrt"] = EngineRunnerAdapter(engine_json)

    ref_runner = TorchRunner(reference, name="torch-fp32")
    runners = [ref_runner, *candidates.values()]
    for runner in runners:
        runner.activate()
    try:
        _run_sizes(spec, ref_runner, candidates, sizes, options, config, report, progress)
    finally:
        for runner in runners:
            runner.deactivate()
    report["passed"] = (all(c["passed"] for c in report["comparisons"]) and
                        all(s["passed"] for s in report["selection"]))
    return report


def _run_sizes(spec, ref_runner, candidates, sizes, options, config, report, progress):
    for size in sizes:
        progress(f"[validate] {size[0]}x{size[1]} px: one step" + (f", then a {options.steps}-step loop"
                                                                   if options.steps else ""))
        feeds = _feeds(spec, ref_runner.graph, options.batch, size)
        report["comparisons"] += compare_step(ref_runner, candidates, feeds, options, size)
        report["selection"] += selection_step(ref_runner, candidates, feeds, options, size)
        if options.steps:
            entries, fidelity = compare_loop(spec, ref_runner, candidates, feeds, options, size, config)
            report["comparisons"] += entries
            report["fidelity"].append(fidelity)


def _graph(spec, config, dtype):
    model = spec.load(dtype)
    report = apply_toma(model, config) if config else None
    return ToMAGraph(model, spec, report).eval()


def _feeds(spec, graph: ToMAGraph, batch: int, size) -> dict:
    net = spec.graph_inputs(batch=batch, height=size[0], width=size[1], smooth=True)
    toma = graph.sample_toma_inputs(net, recompute=True)
    return {n: t.numpy() for n, t in zip(graph.input_names, [*net.values(), *toma.values()])}


def _cast(feeds: dict, dtype: str, runner) -> dict:
    """Float inputs in the candidate's dtype (the ONNX file's); torch runners cast for themselves."""
    if dtype == "fp16" and not isinstance(runner, TorchRunner):
        return {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
    return feeds


def _entry(kind, backend, size, step, output, ref, cand, options) -> dict:
    atol, rtol = tolerance(kind, options.dtype, options.atol, options.rtol)
    stats = compare(ref, cand, atol, rtol)
    ref_bad = int((~np.isfinite(np.asarray(ref, dtype=np.float64))).sum())
    if ref_bad:                      # NaN/Inf in the reference: the inputs are bad, not the candidate
        stats.update(passed=False, reference_nonfinite=ref_bad)
    return dict(kind=kind, backends=["torch-fp32", backend], size=f"{size[0]}x{size[1]}", step=step, output=output,
                **stats)


def compare_step(ref_runner, candidates: dict, feeds: dict, options, size) -> list:
    """One forward: every candidate gets the reference's destinations (recompute off)."""
    ref = ref_runner.infer(feeds, check_inputs=False)
    forced = dict(feeds)
    names = [n for n in ref if n.startswith("toma_dst_out.")]
    forced.update({dst_input(n[len("toma_dst_out."):]): ref[n] for n in names})
    if RECOMPUTE in forced:
        forced[RECOMPUTE] = np.array(False)
    out_name = next(iter(ref))
    entries = []
    for name, runner in candidates.items():
        out = runner.infer(_cast(forced, options.dtype, runner), check_inputs=False)
        entries.append(_entry("step", name, size, 0, out_name, ref[out_name], out[out_name], options))
    return entries


def selection_step(ref_runner, candidates: dict, feeds: dict, options, size) -> list:
    """Each candidate selects on its own; compare picks and objective with the reference's."""
    if RECOMPUTE not in feeds:
        return []
    graph = ref_runner.graph
    ref = ref_runner.infer(feeds, check_inputs=False)
    tiles = dict(graph.last_tiles)
    entries = []
    for name, runner in candidates.items():
        out = runner.infer(_cast(feeds, options.dtype, runner), check_inputs=False)
        per_group = {g: selection_agreement(tiles[g], ref[dst_output(g)], out[dst_output(g)]) for g in graph.groups}
        identical = float(np.mean([v["identical"] for v in per_group.values()]))
        ratio = min(v["objective_ratio"] for v in per_group.values())
        entries.append(dict(backend=name, size=f"{size[0]}x{size[1]}", identical=identical, objective_ratio=ratio,
                            min_objective_ratio=MIN_OBJECTIVE_RATIO, passed=bool(ratio >= MIN_OBJECTIVE_RATIO),
                            groups=per_group))
    return entries


def run_loop(spec, runner, feeds: dict, steps: int, dst_every: int, dtype: str, forced: list | None = None):
    """A denoising loop on one runner: returns the latents after every step and the destinations used.
    With `forced`, step i takes forced[i] as its destinations instead of selecting."""
    scheduler = spec.scheduler()
    scheduler.set_timesteps(steps)
    latent = torch.as_tensor(feeds[spec.latent_input]).float() * getattr(scheduler, "init_noise_sigma", 1.0)
    state = {k: torch.as_tensor(v) for k, v in feeds.items()}
    dst = {k: v for k, v in state.items() if k.startswith("toma_dst.")}
    latents, used = [], []
    for i, t in enumerate(scheduler.timesteps):
        feed = spec.step_inputs(state, scheduler, latent, t)
        if RECOMPUTE in feed:
            feed.update(forced[i] if forced else dst)
            feed[RECOMPUTE] = torch.tensor(forced is None and i % dst_every == 0)
        out = runner.infer(_cast({k: v.numpy() for k, v in feed.items()}, dtype, runner), check_inputs=False)
        names = list(out)
        noise = torch.as_tensor(np.asarray(out[names[0]], dtype=np.float32)).reshape(latent.shape)
        dst = {dst_input(n[len("toma_dst_out."):]): torch.as_tensor(out[n]) for n in names[1:]}
        used.append(dst)
        latent = scheduler.step(noise, t, latent).prev_sample
        latents.append(latent.numpy().copy())
    return latents, used


def compare_loop(spec, ref_runner, candidates, feeds, options, size, config):
    every = config.dst_every if config else 1
    ref_latents, ref_used = run_loop(spec, ref_runner, feeds, options.steps, every, "fp32")
    entries = []
    for name, runner in candidates.items():
        latents, _ = run_loop(spec, runner, feeds, options.steps, every, options.dtype, forced=ref_used)
        for i, (r, c) in enumerate(zip(ref_latents, latents)):
            entries.append(_entry("loop", name, size, i, "latents", r, c, options))
    fidelity = {}
    if config:                       # what merging itself costs: the same loop without ToMA
        model = ref_runner.graph.model
        remove_toma(model)           # the same weights, unpatched for this loop (no second copy in memory)
        try:
            plain = TorchRunner(ToMAGraph(model, spec, None), name="torch-fp32-no-toma")
            with plain:
                base_latents, _ = run_loop(spec, plain, {k: v for k, v in feeds.items() if k in plain.graph.input_names},
                                           options.steps, every, "fp32")
        finally:
            apply_toma(model, config)
        final = compare(base_latents[-1], ref_latents[-1], 0.0, 0.0)
        fidelity = dict(size=f"{size[0]}x{size[1]}", steps=options.steps, compared="torch ToMA vs torch without ToMA",
                        max_abs=final["max_abs"], cosine=final["cosine"],
                        relative_l2=float(np.linalg.norm(ref_latents[-1] - base_latents[-1]) /
                                          max(np.linalg.norm(base_latents[-1]), 1e-30)))
    return entries, fidelity


def _tensorrt_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (TensorRT engines run only on one)"
    try:
        from ..trt.backend import load
        load(None)
    except Exception as err:           # noqa: BLE001 - any reason becomes the skip message
        return str(err)
    return None


def _build_engine(model, config, options, progress) -> str:
    from ..trt import BuildOptions, build

    meta = build(model, config, options.output_dir, BuildOptions(dtype=options.dtype), progress=progress)
    return str(Path(meta["engine"]).with_name("engine.json"))


def table(report: dict) -> str:
    """The human-readable verdict."""
    lines = [f"{'comparison':<34} {'size':>9} {'step':>4} {'max abs':>10} {'p99 abs':>10} {'cosine':>9} "
             f"{'tolerance':>10}  result"]
    for c in report["comparisons"]:
        p99 = f"{c['p99_abs']:.3g}" if c["p99_abs"] is not None else "-"
        verdict = "ok" if c["passed"] else ("FAIL" + (f" (NaN {c['nan']}, Inf {c['inf']})" if c["nan"] or c["inf"]
                                                      else ""))
        lines.append(f"{' vs '.join(c['backends']) + ' ' + c['kind']:<34} {c['size']:>9} {c['step']:>4} "
                     f"{c['max_abs']:>10.3g} {p99:>10} {c['cosine']:>9.6f} {c['tolerance']:>10.3g}  {verdict}")
    for s in report["selection"]:
        lines.append(f"selection {s['backend']:<24} {s['size']:>9}  identical picks {s['identical']:.1%}, objective "
                     f"ratio {s['objective_ratio']:.6f} (>= {s['min_objective_ratio']})  "
                     f"{'ok' if s['passed'] else 'FAIL'}")
    for f in report["fidelity"]:
        lines.append(f"ToMA fidelity {f['size']}, {f['steps']} steps: final latents {f['relative_l2']:.2%} relative L2 "
                     f"from the model without ToMA (cosine {f['cosine']:.4f}); reported, not judged")
    for backend, reason in report["skipped"].items():
        lines.append(f"{backend}: skipped ({reason})")
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)
