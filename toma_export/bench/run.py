"""`toma-export bench`: ToMA against the unmerged baseline and tomesd, per block and backend, in one run.

Every row carries its baseline from the same run (round-robin timing), the overhead of ToMA's own work
(selection + merge weights + merge/unmerge, timed alone on the same backend) as a share of the baseline,
and the output's distance from the baseline as a quality hint. Targets are measured, never asserted.
"""
from __future__ import annotations

import copy
import functools
import os
import platform
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import families
from ..errors import UsageError
from ..onnx.graph import RECOMPUTE
from ..toma import ToMAConfig
from ..toma.selection import recompute_flag
from . import blocks, timing

# The overhead targets (issue 13), measured on whichever machine runs the benchmark and reported, not asserted.
# `block` matches the start of a row's block name; `ratio` None means every ratio from 0.25 to 0.75 (the worst
# row counts).
TARGETS = (
    dict(name="SDXL block, ratio 0.5, ONNX Runtime: ToMA's own work as a share of the baseline block",
         block="sdxl", backend="onnxruntime", ratio=0.5, field="overhead_share", limit=0.02),
    dict(name="SDXL block, ratio 0.5, ONNX Runtime: latency vs the baseline block", block="sdxl",
         backend="onnxruntime", ratio=0.5, field="latency_ratio", limit=0.40),
    dict(name="SDXL block, ratio 0.5, PyTorch: ToMA's own work as a share of the baseline block", block="sdxl",
         backend="torch", ratio=0.5, field="overhead_share", limit=0.02),
    dict(name="every block and backend, ratios 0.25-0.75: ToMA's own work as a share of the baseline (worst row)",
         block="", backend=None, ratio=None, field="overhead_share", limit=0.03),
    dict(name="FLUX single-stream block at width 3072, ratio 0.5, ONNX Runtime: latency vs the baseline block",
         block="flux-single-block-w3072", backend="onnxruntime", ratio=0.5, field="latency_ratio", limit=0.45),
    dict(name="FLUX single-stream block at width 3072, ratio 0.5, ONNX Runtime: ToMA's own work as a share",
         block="flux-single-block-w3072", backend="onnxruntime", ratio=0.5, field="overhead_share", limit=0.02),
)
# Schedules the amortised figures are given for: ToMA's default (merge every step, destinations and weights
# anew each step) and the official FLUX run's (merge every 3rd step), over a loop of LOOP_STEPS steps.
SCHEDULES = {"default": {}, "official FLUX (merge every 3rd step)": dict(merge_steps=3)}
LOOP_STEPS = 30
# which real model's default patch each benchmark block stands for
REAL_MODEL = {"sdxl": "sdxl-base", "flux": "flux-dev"}


@dataclass(frozen=True)
class BenchOptions:
    ratios: tuple = (0.25, 0.5, 0.75)
    blocks: tuple = ("sdxl", "flux")
    backends: tuple = ("torch", "onnxruntime")
    repeats: int = 7                 # timed rounds; the median is reported
    warmup: int = 1
    flux_width: int = 3072           # FLUX.1's real width; smaller (a multiple of 128) for quick runs
    grid: int = 64                   # image-token grid side (64: 1024x1024 px)
    text: int = 512                  # FLUX text tokens
    peer: bool = True                # tomesd on the SDXL block
    models: tuple = ("flux-tiny", "sdxl-tiny")   # whole tiny models, PyTorch, reported only
    model_size: int = 1024
    device: str = "cpu"              # cpu | cuda (GPU mode: half-precision blocks, Triton selection, TensorRT)
    gpu_dtype: str = "fp16"          # fp16 | bf16: the blocks' and parts' dtype in GPU mode
    workdir: str | None = None       # where the ONNX files go (a temporary folder by default)
    quantize: tuple = ()             # 8-bit modes timed four ways on ONNX Runtime (int8: its integer kernels)


def run(options: BenchOptions = BenchOptions(), progress=None) -> dict:
    """Run every requested measurement; returns the JSON document."""
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    torch.set_grad_enabled(False)
    if options.gpu_dtype not in ("fp16", "bf16"):
        raise UsageError(f"--gpu-dtype must be fp16 or bf16, got {options.gpu_dtype!r}")
    if options.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda needs a CUDA GPU visible to PyTorch; drop it to benchmark on the CPU")
    unknown = set(options.blocks) - {"sdxl", "flux"} or set(options.backends) - {"torch", "onnxruntime"}
    if unknown:
        raise UsageError(f"unknown block or backend {sorted(unknown)}: blocks are sdxl, flux; backends torch, "
                         "onnxruntime")
    for r in options.ratios:
        ToMAConfig(ratio=r)                      # a bad ratio fails before anything is built
    if set(options.quantize) - {"int8"}:
        raise UsageError(f"bench --quantize takes int8 (ONNX Runtime's CPU integer kernels), got "
                         f"{','.join(options.quantize)}; FP8 engines are timed by scripts/gpu_checks.sh")
    if options.quantize and (options.device != "cpu" or "onnxruntime" not in options.backends):
        raise UsageError("bench --quantize times the 8-bit graphs on ONNX Runtime on the CPU: keep onnxruntime in "
                         "--backends and drop --device cuda")
    results, notes = [], []
    with tempfile.TemporaryDirectory(prefix="toma-bench-") as tmp:
        workdir = Path(options.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for case in _cases(options):
            for backend in options.backends if options.device == "cpu" else ("torch",):
                progress(f"[bench] {case.name} on {_backend_label(backend, options)}")
                results += bench_block(case, backend, options, workdir, notes, progress)
        if options.device == "cuda":
            results += bench_selection(options, progress)
        for name in options.models:
            progress(f"[bench] whole model {name} at {options.model_size}x{options.model_size} px (PyTorch)")
            results += bench_model(name, options)
        if options.device == "cuda":
            results += bench_engines(options, notes, progress)
    return dict(machine=machine(options), versions=versions(), command=command(),
                options=asdict(options), results=results, amortised=amortised(results),
                targets=check_targets(results), four_way=four_way(results), notes=notes)


def _cases(options: BenchOptions):
    width = options.flux_width
    if "sdxl" in options.blocks:
        yield blocks.sdxl_block(options.grid)
    if "flux" in options.blocks:
        yield blocks.flux_single_block(width, options.grid, options.text)


def _backend_label(backend: str, options: BenchOptions) -> str:
    return f"torch-cuda-{options.gpu_dtype}" if options.device == "cuda" else backend


def _dtype(options: BenchOptions) -> torch.dtype:
    """The blocks' dtype: fp32 on the CPU, the chosen half precision on a GPU."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[options.gpu_dtype] if options.device == "cuda" \
        else torch.float32


def bench_block(case, backend: str, options: BenchOptions, workdir: Path, notes: list, progress) -> list:
    """Baseline, ToMA per ratio, ToMA's overhead per ratio and (SDXL) tomesd, round-robin on one backend."""
    modules = {"baseline": case.baseline()}
    for r in options.ratios:
        config = ToMAConfig(ratio=r)
        modules[f"toma@{r}"] = case.toma(config)
        modules[f"overhead@{r}"] = case.overhead(config)
    peer = options.peer and blocks.tomesd_supports(case)
    if peer:
        modules["tomesd@0.5"] = blocks.tomesd_net(case)
    inputs = tuple(case.inputs.values())
    if backend == "onnxruntime":                      # the 8-bit variants: ONNX Runtime's integer kernels
        for mode in options.quantize:
            progress(f"[bench]   calibrating {mode} with modelopt (the block, then the block with ToMA)")
            modules[mode] = _quantized(case.baseline(), mode, inputs)
            for r in options.ratios:
                modules[f"{mode}+toma@{r}"] = _quantized(case.toma(ToMAConfig(ratio=r)), mode, inputs)
    sync = None
    if options.device == "cuda":
        modules = {k: m.to("cuda", _dtype(options)) for k, m in modules.items()}
        inputs = tuple(t.to("cuda", _dtype(options)) for t in inputs)
        sync = torch.cuda.synchronize
        case.inputs = dict(zip(case.inputs, inputs))
    calls = {}
    for name, module in modules.items():
        if backend == "torch":
            calls[name] = timing.torch_call(module, inputs)
            continue
        path = workdir / f"{case.name}-{name}.onnx"
        progress(f"[bench]   exporting {name} to ONNX")
        try:
            timing.export_onnx(module, inputs, path)
        except Exception as err:        # tomesd: report why it does not export instead of failing the run
            if not name.startswith("tomesd"):
                raise
            notes.append(f"tomesd on {case.name} does not export to ONNX: {type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]}")
            continue
        calls[name] = timing.onnxruntime_call(path, inputs, torch.get_num_threads())
    if peer and backend == "torch":
        calls["tomesd-overhead"] = blocks.tomesd_overhead(case, modules["tomesd@0.5"])
    progress(f"[bench]   timing {len(calls)} variants, {options.warmup} warm-up + {options.repeats} rounds")
    medians = timing.round_robin(calls, options.repeats, options.warmup, sync)
    breakdowns = {r: bench_parts(case, backend, ToMAConfig(ratio=r), options, workdir, progress)
                  for r in options.ratios}
    reference = _output(calls["baseline"])
    label = _backend_label(backend, options)
    base = medians["baseline"]
    rows = [_row(case, label, "baseline", 0.0, base, base, None, 0.0)]
    for r in options.ratios:
        rows.append(_row(case, label, "toma", r, medians[f"toma@{r}"], base, medians[f"overhead@{r}"],
                         _rel_l2(_output(calls[f"toma@{r}"]), reference), breakdown=breakdowns[r]))
    if "tomesd@0.5" in calls:
        rows.append(_row(case, label, "tomesd", 0.5, medians["tomesd@0.5"], base, medians.get("tomesd-overhead"),
                         _rel_l2(_output(calls["tomesd@0.5"]), reference)))
    for mode in options.quantize if backend == "onnxruntime" else ():
        rows.append(_row(case, label, mode, 0.0, medians[mode], base, None, _rel_l2(_output(calls[mode]), reference)))
        for r in options.ratios:
            rows.append(_row(case, label, f"{mode}+toma", r, medians[f"{mode}+toma@{r}"], base, None,
                             _rel_l2(_output(calls[f"{mode}+toma@{r}"]), reference)))
    return rows


def _quantized(module: torch.nn.Module, mode: str, inputs: tuple) -> torch.nn.Module:
    """The module with its Linear / Conv2d layers 8-bit, calibrated by modelopt on the benchmark's inputs."""
    from ..calibration import calibrate_module

    calibrate_module(module, mode, lambda net: [net(*inputs) for _ in range(2)])
    return module


def four_way(results: list) -> list:
    """Whether the speed-ups multiply: per block, backend, 8-bit mode and ratio, the step's speed-up from ToMA
    alone, from 8-bit alone and from both, against the product of the first two (the goal: both >= 0.9 x
    product)."""
    out = []
    for q in results:
        if not q["method"].endswith("+toma"):
            continue
        mode = q["method"].removesuffix("+toma")
        same = [r for r in results if r["block"] == q["block"] and r["backend"] == q["backend"]]
        toma = next((r for r in same if r["method"] == "toma" and r["ratio"] == q["ratio"]), None)
        alone = next((r for r in same if r["method"] == mode), None)
        if toma is None or alone is None:
            continue
        product = toma["speedup"] * alone["speedup"]
        out.append(dict(block=q["block"], backend=q["backend"], mode=mode, ratio=q["ratio"],
                        baseline_ms=q["baseline_median_ms"], toma_ms=toma["median_ms"], quant_ms=alone["median_ms"],
                        both_ms=q["median_ms"], toma_speedup=toma["speedup"], quant_speedup=alone["speedup"],
                        both_speedup=q["speedup"], product=round(product, 3),
                        share_of_product=round(q["speedup"] / product, 3),
                        multiplies=q["speedup"] >= 0.9 * product))
    return out


def bench_parts(case, backend: str, config: ToMAConfig, options: BenchOptions, workdir: Path, progress) -> dict:
    """ToMA's overhead part by part (blocks.PARTS), each part alone on the backend, timed round-robin with
    more rounds than the blocks (they take milliseconds). Returns the medians in ms, the round trips per
    block call, and their sum as the block pays it (blocks.parts_total)."""
    device = options.device
    dtype = _dtype(options)
    calls = {}
    for name, (module, inputs) in blocks.parts(case, config, device, dtype).items():
        if backend == "torch":
            calls[name] = timing.torch_call(module.to(device), inputs)
            continue
        path = workdir / f"{case.name}-part-{name}@{config.ratio}.onnx"
        calls[name] = timing.onnxruntime_call(timing.export_onnx(module, inputs, path), inputs,
                                              torch.get_num_threads())
    progress(f"[bench]   timing ToMA's parts at ratio {config.ratio} ({', '.join(calls)})")
    sync = torch.cuda.synchronize if device == "cuda" else None
    ms = timing.round_robin(calls, options.repeats * 5, options.warmup + 2, sync)
    out = {f"{name}_ms": round(v, 3) for name, v in ms.items()}
    out.update(round_trips=case.merge_pairs, sum_ms=round(blocks.parts_total(ms, case.merge_pairs), 3))
    return out


def _output(call) -> torch.Tensor:
    out = call()
    return torch.as_tensor(out).float().cpu()


def _rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return round(float((out - ref).norm() / ref.norm()), 5)


def _row(case, backend, method, ratio, median, base, overhead, rel_l2, block=None, breakdown=None) -> dict:
    row = dict(block=block or case.name, backend=backend, method=method, ratio=ratio,
               median_ms=round(median, 3), baseline_median_ms=round(base, 3),
               speedup=round(base / median, 3), latency_ratio=round(median / base, 3),
               overhead_ms=None if overhead is None else round(overhead, 3),
               overhead_share=None if overhead is None else round(overhead / base, 4),
               default=method == "toma" and ratio == ToMAConfig().ratio, rel_l2_vs_baseline=rel_l2)
    if breakdown is not None:
        row["breakdown"] = breakdown
    return row


def amortised(results: list) -> list:
    """Per-step overhead of a whole denoising loop, from each block row's parts (scaled to its measured
    overhead): in the real model's default patch, a group's first block selects and computes weights (when
    the schedule says so) and every patched block pays its layout copies and round trips on the steps that
    merge. Set against the patched blocks' baseline per step (each counted as the benchmark block), beside
    the every-call worst case."""
    out = []
    for row in results:
        kind = row["block"].split("-")[0]
        if row["method"] != "toma" or "breakdown" not in row or kind not in REAL_MODEL:
            continue
        groups, patched = patched_layout(REAL_MODEL[kind])
        # the parts timed alone, scaled to the overhead timed together (so the every-step figure of the
        # default schedule never exceeds the every-call one for timing noise of the parts)
        scale = row["overhead_ms"] / row["breakdown"]["sum_ms"] if row["overhead_ms"] else 1.0
        b = {k: v * scale if k.endswith("_ms") else v for k, v in row["breakdown"].items()}
        once = b["selection_ms"] + b["weights_ms"]                   # per group, when refreshed
        per_block = b["fold_ms"] + b["unfold_ms"] + b["round_trips"] * (b["merge_ms"] + b["unmerge_ms"])
        for label, schedule in SCHEDULES.items():
            config = ToMAConfig(ratio=row["ratio"], **schedule)
            merged = [s for s in range(LOOP_STEPS) if config.merges_at(s)]
            selects = sum(config.refreshes_at(s) for s in merged)
            weights = sum(config.reweights_at(s) and not config.refreshes_at(s) for s in merged)
            total = groups * (selects * once + weights * b["weights_ms"]) + patched * len(merged) * per_block
            per_step = total / LOOP_STEPS
            base = patched * row["baseline_median_ms"]
            out.append(dict(block=row["block"], backend=row["backend"], ratio=row["ratio"], schedule=label,
                            model=REAL_MODEL[kind], groups=groups, patched_blocks=patched, steps=LOOP_STEPS,
                            merged_steps=len(merged), overhead_per_step_ms=round(per_step, 3),
                            patched_baseline_per_step_ms=round(base, 3),
                            overhead_share_per_step=round(per_step / base, 5),
                            every_call_share=row["overhead_share"]))
    return out


@functools.lru_cache(maxsize=None)
def patched_layout(name: str) -> tuple[int, int]:
    """(groups, patched blocks) of ToMA's default patch on a real configuration, built on the meta device."""
    from ..models import real_configs
    from ..toma import apply_toma

    with torch.device("meta"):
        model = real_configs._network_class(name)(**real_configs.config(name))
    report = apply_toma(model, ToMAConfig())
    return len(report.groups), len(report.blocks)


def sharing_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A second module tree over the same parameter and buffer tensors: one can be patched and both timed,
    with the weights loaded once (a real model's folder would otherwise be read and held twice)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def bench_model(name: str, options: BenchOptions) -> list:
    """A whole tiny model, unpatched vs ToMA's default config, PyTorch eager; every timed ToMA call
    selects anew (step 0)."""
    from .. import models
    from ..toma import apply_toma, reset_toma

    spec = models.get(name)
    device = options.device
    base = spec.load().to(device)
    patched = sharing_weights(base)
    apply_toma(patched, ToMAConfig())
    inputs = spec.sample_inputs(batch=1, height=options.model_size, width=options.model_size, smooth=True)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def toma():
        reset_toma(patched)
        return patched(**inputs, return_dict=False)[0]

    calls = {"baseline": lambda: base(**inputs, return_dict=False)[0], "toma": toma}
    sync = torch.cuda.synchronize if device == "cuda" else None
    medians = timing.round_robin(calls, options.repeats, options.warmup, sync)
    rel = _rel_l2(toma().float().cpu(), calls["baseline"]().float().cpu())
    block = f"{name} (whole model, {options.model_size}x{options.model_size})"
    label = "torch" if device == "cpu" else "torch-cuda-fp32"
    b = medians["baseline"]
    return [_row(None, label, "baseline", 0.0, b, b, None, 0.0, block=block),
            _row(None, label, "toma", ToMAConfig().ratio, medians["toma"], b, None, rel, block=block)]


def bench_selection(options: BenchOptions, progress) -> list:
    """GPU mode: the Triton selection kernel vs the PyTorch greedy on one 1024x1024 grid of 4x4 tiles."""
    from ..toma.selection import facility_location
    from ..toma.tiles import destinations_per_tile

    rows = []
    for width in (640, options.flux_width):
        x = torch.randn(options.grid * options.grid // 16, 16, width, device="cuda", dtype=torch.float16)
        d = destinations_per_tile((4, 4), 0.5)
        progress(f"[bench] selection of {x.shape[0]} tiles, width {width}: Triton vs PyTorch")
        calls = {impl: (lambda impl=impl, x=x, d=d: facility_location(x, d, impl=impl)) for impl in ("torch", "triton")}
        medians = timing.round_robin(calls, options.repeats * 4, options.warmup + 2, torch.cuda.synchronize)
        same = bool((calls["torch"]() == calls["triton"]()).all())
        rows.append(dict(block=f"selection {x.shape[0]}x16 tokens, width {width}", backend="cuda",
                         method="triton-kernel", ratio=0.5, median_ms=round(medians["triton"], 4),
                         baseline_median_ms=round(medians["torch"], 4),
                         speedup=round(medians["torch"] / medians["triton"], 3),
                         latency_ratio=round(medians["triton"] / medians["torch"], 3), overhead_ms=None,
                         overhead_share=None, default=True, rel_l2_vs_baseline=0.0 if same else None))
    return rows


def bench_engines(options: BenchOptions, notes: list, progress) -> list:
    """GPU mode with full TensorRT: the tiny models' engines, ToMA vs baseline (built or reused)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        notes.append("TensorRT engines not timed: the tensorrt module is not installed on this machine")
        return []
    from .. import models
    from ..artifacts import DTYPES
    from ..trt.build import BuildOptions, build
    from ..runtime.tensorrt import EngineRunner

    rows = []
    for name in options.models:
        spec = models.get(name)
        size = options.model_size
        metas = {}
        for method, config in (("baseline", None), ("toma", ToMAConfig())):
            progress(f"[bench] building the {method} TensorRT engine of {name} (or reusing it)")
            metas[method] = build(name, config, options=BuildOptions(backend="tensorrt", static=True,
                                                                     opt_size=(size, size)))
        runners = {m: EngineRunner(Path(meta["engine"]).with_name("engine.json")) for m, meta in metas.items()}
        net = spec.graph_inputs(batch=1, height=size, width=size, dtype=DTYPES[metas["toma"]["dtype"]], smooth=True)
        feeds = {}
        for m, meta in metas.items():
            feeds[m] = {k: v.cuda() for k, v in net.items()}
            for i in meta["inputs"]:
                if i["name"].startswith("toma_dst."):
                    feeds[m][i["name"]] = torch.zeros(i["shape"], dtype=torch.int64, device="cuda")
            if meta["toma"]:
                feeds[m][RECOMPUTE] = recompute_flag(True, device="cuda")
        calls = {m: (lambda r=runners[m], f=feeds[m]: r(f)) for m in runners}
        medians = timing.round_robin(calls, options.repeats, options.warmup, torch.cuda.synchronize)
        block = f"{name} engine ({size}x{size}, {metas['toma']['dtype']})"
        b = medians["baseline"]
        rows += [_row(None, "tensorrt", "baseline", 0.0, b, b, None, 0.0, block=block),
                 _row(None, "tensorrt", "toma", 0.5, medians["toma"], b, None, None, block=block)]
    return rows


def check_targets(results: list) -> list:
    out = []
    for t in TARGETS:
        rows = [r for r in results if r["block"].startswith(t["block"]) and r["method"] == "toma"
                and "whole model" not in r["block"] and r[t["field"]] is not None
                and (t["backend"] is None or r["backend"] == t["backend"])
                and (r["ratio"] == t["ratio"] if t["ratio"] is not None else 0.25 <= r["ratio"] <= 0.75)]
        entry = dict(name=t["name"], limit=t["limit"], measured=None, met=None, missed_by=None, row=None)
        if rows:
            worst = max(rows, key=lambda r: r[t["field"]])
            value = worst[t["field"]]
            entry.update(measured=value, met=value <= t["limit"], missed_by=round(max(0.0, value - t["limit"]), 4),
                         row=f"{worst['block']} / {worst['backend']} / ratio {worst['ratio']:g}")
        out.append(entry)
    return out


def cpu_name() -> str:
    """The CPU model (/proc/cpuinfo), which every timing names: machines of one kind differ."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(options: BenchOptions) -> dict:
    out = dict(cpu=cpu_name(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(), os=platform.platform(),
               python=platform.python_version())
    try:
        out["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if options.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    return out


def versions() -> dict:
    from ..artifacts import versions as installed

    return installed("toma-export", "torch", "diffusers", "onnx", "onnxruntime", "tomesd", "triton")


def command() -> str:
    prog = Path(sys.argv[0]).name
    args = sys.argv[1:]
    if prog in ("bench.py", "toma-export") or not args:
        return " ".join(["toma-export" if prog == "toma-export" else f"python scripts/{prog}", *args])
    return " ".join([prog, *args])
