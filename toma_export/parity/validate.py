"""`toma-export validate`: is an exported graph or engine as accurate as the PyTorch ToMA reference?

The fp32 PyTorch ToMA model is the reference for every candidate (ONNX Runtime on CPU computes many fp16
ops in fp32, so an fp16 run is never a reference). Downstream parity is measured with destinations forced
identical (the graphs take them as inputs); selection is judged separately, by the share of identical
picks and the candidate's facility-location objective relative to the reference's, so near-ties neither
masquerade as bugs nor hide them. A whole denoising loop with the model's real scheduler follows, because
fp16 overflow and drift show over steps, not in one. ToMA's own cost (the same loop without merging) is
reported beside it, not judged.

The reference is a record per size (inputs, outputs, selection features, loop latents and destinations)
that can be saved on one machine and loaded on another, where only the candidates run.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .. import models
from ..artifacts import DTYPES, Artifact, config_from_section, toma_section
from ..errors import ArtifactError, UsageError
from ..onnx import ExportOptions, ToMAGraph, export
from ..onnx.graph import RECOMPUTE, dst_input, dst_output
from ..toma.selection import recompute_flag
from ..toma import ToMAConfig, apply_toma, remove_toma
from ..resources import default_output
from .metrics import compare, selection_agreement, tolerance
from .runners import EngineRunnerAdapter, TorchRunner, onnxruntime_provider, onnxruntime_runner

BACKENDS = ("torch", "onnxruntime", "tensorrt")
MIN_OBJECTIVE_RATIO = 0.999   # a candidate's own picks may differ on near-ties, not cover the tile worse
RECORD_FORMAT = 2          # 2: the full ToMA configuration in the record's metadata


@dataclass(frozen=True)
class ValidateOptions:
    backends: tuple = ("torch", "onnxruntime")
    dtype: str | None = None      # None: the --onnx file's dtype, else fp32
    sizes: tuple | None = None    # ((height, width), ...) pixels; None = the model's default size
    steps: int = 0                # > 0: also a whole loop of that many steps
    batch: int | None = None      # None: a static export's batch, else 2 (CFG)
    atol: float | None = None
    rtol: float | None = None
    onnx: str | None = None       # an exported file (its toma.json gives the ToMA settings); None = export
    engine: str | None = None     # a built engine's engine.json; None = build one when tensorrt is asked for
    output_dir: str | None = None
    save_reference: str | None = None  # write the reference records (.npz) for another machine
    load_reference: str | None = None  # take the reference from such a file instead of running PyTorch
    bisect: bool = False               # on a failing ONNX Runtime step, name the first block out of tolerance


def validate(model: str, config: ToMAConfig | None, options: ValidateOptions = ValidateOptions(),
             progress=None) -> dict:
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    unknown = set(options.backends) - set(BACKENDS)
    if unknown or ("torch" not in options.backends and not options.load_reference):
        raise UsageError(f"backends must include torch (the reference, unless --load-reference) and come from "
                         f"{', '.join(BACKENDS)}; got {','.join(options.backends)}")
    if options.dtype not in (None, *DTYPES):
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    if options.steps < 0:
        raise UsageError(f"--steps must be >= 0 (0: one step, N: also an N-step loop), got {options.steps}")
    spec = models.get(model)
    stored = load_records(options.load_reference) if options.load_reference else None
    if stored and stored["meta"]["model"] != spec.name:
        raise ArtifactError(f"{options.load_reference} holds a reference for {stored['meta']['model']}, not "
                            f"{spec.name}")
    if stored:
        config, options = _from_stored(stored["meta"], options)
    elif options.onnx:
        config, options = _from_export(options.onnx, spec, options)
    options = replace(options, batch=options.batch or 2, dtype=options.dtype or "fp32")
    sizes = list(options.sizes or [spec.size(None, None)])
    report = dict(model=spec.name, dtype=options.dtype, providers={}, skipped={}, comparisons=[], selection=[],
                  fidelity=[], toma=toma_section(config),
                  reference="loaded from " + options.load_reference if stored else "torch fp32")

    reference = None if stored else _graph(spec, config, torch.float32)
    candidates = _candidates(model, spec, config, options, report, progress)
    runners = ([TorchRunner(reference, name="torch-fp32")] if reference else []) + list(candidates.values())
    for runner in runners:
        runner.activate()
    records = stored["records"] if stored else []
    try:
        for i, size in enumerate(sizes):
            progress(f"[validate] {size[0]}x{size[1]} px: one step" +
                     (f", then a {options.steps}-step loop" if options.steps else ""))
            if not stored:
                records.append(make_record(spec, runners[0], config, options, size))
            record = records[i]
            step = compare_step(record, candidates, options, size)
            report["comparisons"] += step
            if options.bisect and reference is not None:
                report.setdefault("bisect", []).extend(
                    _bisect(reference, report.get("onnx"), record, options, size, step))
            report["selection"] += selection_step(record, candidates, options, size)
            if options.steps:
                report["comparisons"] += compare_loop(spec, record, candidates, options, size, config)
                if reference is not None and config:
                    report["fidelity"].append(fidelity(spec, runners[0], record, options, size, config))
    finally:
        for runner in runners:
            runner.deactivate()
    if options.save_reference and not stored:
        save_records(options.save_reference, records, dict(
            format=RECORD_FORMAT, model=spec.name, sizes=sizes, steps=options.steps, batch=options.batch,
            toma=report["toma"]))
        report["saved_reference"] = options.save_reference
    if not report["comparisons"]:           # nothing compared is not a pass (e.g. --backends torch in fp32)
        report["nothing_compared"] = ("no candidate ran: add onnxruntime or tensorrt to --backends, or validate "
                                      "torch in --dtype fp16/bf16")
    report["passed"] = (bool(report["comparisons"]) and all(c["passed"] for c in report["comparisons"]) and
                        all(s["passed"] for s in report["selection"]))
    return report


def _from_stored(meta: dict, options: ValidateOptions):
    config = config_from_section(meta["toma"], options.load_reference)
    sizes = tuple(tuple(s) for s in meta["sizes"])
    return config, replace(options, sizes=sizes, steps=meta["steps"], batch=meta["batch"])


def _from_export(onnx_path: str, spec, options: ValidateOptions):
    """The file's ToMA settings, every field, and for a static export its own size and batch."""
    artifact = Artifact.load(onnx_path, "onnx")
    artifact.check_model(spec.name)
    size = artifact.static_size
    if size is not None:
        if options.sizes and any(tuple(s) != size for s in options.sizes):
            raise UsageError(f"{onnx_path} is a static {size[0]}x{size[1]} export; validate it at that size (drop "
                             "--sizes) or export with --dynamic")
        if options.batch not in (None, artifact.meta["batch"]):
            raise UsageError(f"{onnx_path} is a static export at batch {artifact.meta['batch']}; drop --batch or "
                             "export with --dynamic")
        options = replace(options, sizes=(size,), batch=artifact.meta["batch"])
    if options.dtype not in (None, artifact.meta["dtype"]):
        raise UsageError(f"{onnx_path} is a {artifact.meta['dtype']} export; drop --dtype {options.dtype} or pass an "
                         f"export in {options.dtype}")
    return artifact.config, replace(options, onnx=str(artifact.path), dtype=artifact.meta["dtype"])


def _candidates(model, spec, config, options, report, progress) -> dict:
    candidates = {}
    if "torch" in options.backends and options.dtype != "fp32":
        candidates[f"torch-{options.dtype}"] = TorchRunner(_graph(spec, config, DTYPES[options.dtype]),
                                                           name=f"torch-{options.dtype}")
    if "onnxruntime" in options.backends:
        path = options.onnx or export(model, config, Path(options.output_dir or default_output()) / "onnx",
                                      ExportOptions(dynamic=True, dtype=options.dtype), progress=progress)["onnx"]
        if options.dtype == "bf16" and onnxruntime_provider() == "CPUExecutionProvider":   # before loading it
            raise UsageError("ONNX Runtime's CPU provider has no bf16 kernels; validate bf16 with "
                             "--backends torch,tensorrt on a GPU, or export fp16/fp32 for ONNX Runtime")
        runner, provider = onnxruntime_runner(path)
        candidates["onnxruntime"] = runner
        report["providers"]["onnxruntime"] = provider
        report["onnx"] = path
    if "tensorrt" in options.backends:
        reason = _tensorrt_unavailable()
        if reason:
            report["skipped"]["tensorrt"] = reason
            progress(f"[validate] tensorrt skipped: {reason}")
        else:
            if options.engine:
                Artifact.load(options.engine, "engine").check_model(spec.name)
            candidates["tensorrt"] = EngineRunnerAdapter(options.engine or _build_engine(model, config, options,
                                                                                         progress))
    return candidates


def _graph(spec, config, dtype):
    """The PyTorch graph, on the GPU when there is one (an fp32 FLUX.1-dev needs about 48 GB)."""
    model = spec.load(dtype).to("cuda" if torch.cuda.is_available() else "cpu")
    report = apply_toma(model, config) if config else None
    return ToMAGraph(model, spec, report).eval()


def _feeds(spec, graph: ToMAGraph, batch: int, size) -> dict:
    net = spec.graph_inputs(batch=batch, height=size[0], width=size[1], smooth=True)
    toma = graph.sample_toma_inputs(net, recompute=True)
    return {n: t.numpy() for n, t in zip(graph.input_names, [*net.values(), *toma.values()])}


def make_record(spec, ref_runner, config, options, size) -> dict:
    """Everything the candidates are compared against at one size, computed by the fp32 reference."""
    feeds = _feeds(spec, ref_runner.graph, options.batch, size)
    step = dict(ref_runner.infer(feeds, check_inputs=False))
    record = dict(feeds=feeds, step=step,
                  tiles={g: t.detach().cpu().numpy() for g, t in ref_runner.graph.last_tiles.items()})
    if options.steps:
        record["latents"], record["used"] = run_loop(spec, ref_runner, feeds, options.steps, config, "fp32")
    return record


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


def _forced(feeds: dict, outputs: dict) -> dict:
    """Inputs that make a graph reuse the destinations in `outputs` instead of selecting."""
    forced = dict(feeds)
    forced.update({dst_input(n[len("toma_dst_out."):]): np.asarray(v) for n, v in outputs.items()
                   if n.startswith("toma_dst_out.")})
    if RECOMPUTE in forced:
        forced[RECOMPUTE] = recompute_flag(False).numpy()
    return forced


def compare_step(record: dict, candidates: dict, options, size) -> list:
    """One forward: every candidate gets the reference's destinations (recompute off)."""
    ref = record["step"]
    out_name = next(iter(ref))
    forced = _forced(record["feeds"], ref)
    entries = []
    for name, runner in candidates.items():
        out = runner.infer(_cast(forced, options.dtype, runner), check_inputs=False)
        entries.append(_entry("step", name, size, 0, out_name, ref[out_name], out[out_name], options))
    return entries


def _bisect(reference, onnx_path, record, options, size, step_entries) -> list:
    from .bisect import bisect

    failed = [e for e in step_entries if not e["passed"] and e["backends"][1] == "onnxruntime"]
    if not failed or onnx_path is None:
        return []
    _, rtol = tolerance("step", options.dtype, options.atol, options.rtol)
    result = bisect(reference, onnx_path, _cast(_forced(record["feeds"], record["step"]), options.dtype, None), rtol)
    return [dict(result, backend="onnxruntime", size=f"{size[0]}x{size[1]}")]


def selection_step(record: dict, candidates: dict, options, size) -> list:
    """Each candidate selects on its own; compare picks and objective with the reference's."""
    if RECOMPUTE not in record["feeds"]:
        return []
    entries = []
    for name, runner in candidates.items():
        out = runner.infer(_cast(record["feeds"], options.dtype, runner), check_inputs=False)
        per_group = {g: selection_agreement(torch.as_tensor(t), record["step"][dst_output(g)], out[dst_output(g)])
                     for g, t in record["tiles"].items()}
        identical = float(np.mean([v["identical"] for v in per_group.values()]))
        ratio = min(v["objective_ratio"] for v in per_group.values())
        entries.append(dict(backend=name, size=f"{size[0]}x{size[1]}", identical=identical, objective_ratio=ratio,
                            min_objective_ratio=MIN_OBJECTIVE_RATIO, passed=bool(ratio >= MIN_OBJECTIVE_RATIO),
                            groups=per_group))
    return entries


def run_loop(spec, runner, feeds: dict, steps: int, config: ToMAConfig | None, dtype: str,
             forced: list | None = None):
    """A denoising loop on one runner: the latents after every step and the destinations each step used.
    Every step runs the ToMA graph, refreshing destinations by the config's rule; with `forced`, step i
    reuses forced[i] instead of selecting."""
    every_step = replace(config, merge_steps=None) if config else None
    scheduler = spec.scheduler()
    scheduler.set_timesteps(steps)
    latent = torch.as_tensor(feeds[spec.latent_input]).float() * getattr(scheduler, "init_noise_sigma", 1.0)
    state = {k: torch.as_tensor(v) for k, v in feeds.items()}
    dst = {k: v for k, v in state.items() if k.startswith("toma_dst.")}
    latents, used = [], []
    for i, t in enumerate(scheduler.timesteps):
        feed = spec.step_inputs(state, scheduler, latent, t)
        if RECOMPUTE in feed:
            feed.update({k: torch.as_tensor(v) for k, v in forced[i].items()} if forced else dst)
            feed[RECOMPUTE] = recompute_flag(forced is None and (every_step is None or every_step.refreshes_at(i)))
        out = runner.infer(_cast({k: v.numpy() for k, v in feed.items()}, dtype, runner), check_inputs=False)
        names = list(out)
        noise = torch.as_tensor(np.asarray(out[names[0]], dtype=np.float32)).reshape(latent.shape)
        dst = {dst_input(n[len("toma_dst_out."):]): torch.as_tensor(np.asarray(out[n])) for n in names[1:]}
        used.append({k: v.numpy() for k, v in dst.items()})
        latent = scheduler.step(noise, t, latent).prev_sample
        latents.append(latent.numpy().copy())
    return latents, used


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
                max_abs=final["max_abs"], cosine=final["cosine"],
                relative_l2=float(np.linalg.norm(record["latents"][-1] - base[-1]) /
                                  max(np.linalg.norm(base[-1]), 1e-30)))


def save_records(path, records: list, meta: dict) -> None:
    """Reference records as one .npz (written under a temporary name, then renamed)."""
    flat = {"meta": np.array(json.dumps(meta))}
    for i, rec in enumerate(records):
        for part in ("feeds", "step", "tiles"):
            flat.update({f"{i}/{part}/{k}": np.asarray(v) for k, v in rec[part].items()})
        for s, latent in enumerate(rec.get("latents", [])):
            flat[f"{i}/latents/{s}"] = latent
            flat.update({f"{i}/used/{s}/{k}": v for k, v in rec["used"][s].items()})
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **flat)
    tmp.replace(path)


def load_records(path) -> dict:
    try:
        data = np.load(path, allow_pickle=False)
        meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError) as err:
        raise ArtifactError(f"{path} is not a toma-export reference file ({err}); make one with --save-reference") from None
    if meta.get("format") != RECORD_FORMAT:
        raise ArtifactError(f"{path} has reference format {meta.get('format')}, this toolkit reads {RECORD_FORMAT}; "
                         "save the reference again with this version")
    records = []
    for i in range(len(meta["sizes"])):
        rec = {part: {} for part in ("feeds", "step", "tiles")}
        rec["latents"], rec["used"] = [None] * meta["steps"], [dict() for _ in range(meta["steps"])]
        for key in data.files:
            head, _, rest = key.partition("/")
            if head != str(i):
                continue
            part, _, name = rest.partition("/")
            if part in rec and part not in ("latents", "used"):
                rec[part][name] = data[key]
            elif part == "latents":
                rec["latents"][int(name)] = data[key]
            elif part == "used":
                s, _, tensor = name.partition("/")
                rec["used"][int(s)][tensor] = data[key]
        rec["step"] = {k: rec["step"][k] for k in sorted(rec["step"], key=lambda n: n.startswith("toma_dst_out."))}
        records.append(rec)
    return dict(meta=meta, records=records)


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
    lines = [f"reference: {report['reference']}",
             f"{'comparison':<34} {'size':>9} {'step':>4} {'max abs':>10} {'p99 abs':>10} {'cosine':>9} "
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
    for b in report.get("bisect", []):
        lines.append(f"bisect {b['backend']} {b['size']}: first block out of tolerance: "
                     f"{b['first_failing_block'] or 'none (the error comes after the transformer blocks)'}")
    for backend, reason in report["skipped"].items():
        lines.append(f"{backend}: skipped ({reason})")
    if report.get("nothing_compared"):
        lines.append(f"nothing compared: {report['nothing_compared']}")
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)


def write_report(report: dict, folder) -> list[str]:
    """report.json, report.txt and errors.png (error per step per backend) in `folder`; returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    (folder / "report.txt").write_text(table(report) + "\n")
    files = [str(folder / "report.json"), str(folder / "report.txt")]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return files
    fig, ax = plt.subplots(figsize=(7, 4))
    series = {}
    for c in report["comparisons"]:
        if c["kind"] == "loop":
            series.setdefault((c["backends"][1], c["size"]), []).append((c["step"], c["max_abs"] / max(c["scale"], 1e-30)))
    for (backend, size), points in sorted(series.items()):
        steps, errs = zip(*sorted(points))
        ax.semilogy(steps, [max(e, 1e-12) for e in errs], marker="o", label=f"{backend} {size}")
    step_errs = [(c["backends"][1], c["size"], c["max_abs"] / max(c["scale"], 1e-30))
                 for c in report["comparisons"] if c["kind"] == "step"]
    for backend, size, err in step_errs:
        if (backend, size) not in series:
            ax.semilogy([0], [max(err, 1e-12)], marker="s", label=f"{backend} {size} (one step)")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("denoising step")
    ax.set_ylabel("max |candidate - reference| / max |reference|")
    ax.set_title(f"{report['model']} {report['dtype']}: error against the fp32 PyTorch reference")
    ax.grid(True, which="both", alpha=0.3)
    if series or step_errs:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "errors.png", dpi=100)
    plt.close(fig)
    return files + [str(folder / "errors.png")]
