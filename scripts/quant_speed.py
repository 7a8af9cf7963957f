"""One denoising step of the full SDXL base UNet (random weights, fp32, 1024x1024) on ONNX Runtime's CPU
provider, timed four ways: unquantized, ToMA (ratio 0.5, destinations selected on the step), INT8 (modelopt's
SmoothQuant and percentile recipe, ONNX Runtime's integer kernels) and INT8 + ToMA. Says whether the speed-ups
multiply (the goal: INT8 + ToMA >= 0.9 x INT8's x ToMA's). Prints one JSON object and writes it to --out.

    python scripts/quant_speed.py --out docs/quantize/sdxl-base-four-way.json     # about 25 minutes, 2 cores

The folder has no text encoders or VAE, so the scales are calibrated on the network alone: modelopt runs the
ToMA-patched UNet on the family's smooth sample inputs (--calib-size, smaller than the timed size to save
time). Both INT8 graphs use those scales: what a step costs does not depend on their values. Each graph is
exported in its own process and timed in its own process, one after the other (four sessions of a 10 GB
network do not fit in 24 GB together), so the machine must be otherwise idle.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("unquantized", "toma", "int8", "int8+toma")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="sdxl-base", help="a real configuration (sdxl-base)")
    p.add_argument("--size", type=int, default=1024, help="pixel side timed (1024)")
    p.add_argument("--calib-size", type=int, default=512, help="pixel side the scales are calibrated at (512)")
    p.add_argument("--batch", type=int, default=1, help="batch of the timed step (1)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant after one warm-up (5)")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--work", type=Path, help="folder for the model folder and exports (default: a temporary one)")
    p.add_argument("--time", nargs=2, metavar=("ONNX", "VARIANT"), help=argparse.SUPPRESS)   # children's jobs
    p.add_argument("--prepare", type=Path, metavar="WORK", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.time:
        print(json.dumps(_time(args.time[0], args)))
        return 0
    if args.prepare:
        print(json.dumps(_prepare(args, args.prepare)))
        return 0
    from toma_export.bench.run import cpu_name

    result = dict(machine=cpu_name(), model=args.model, size=args.size, batch=args.batch, dtype="fp32",
                  calib_size=args.calib_size, ratio=args.ratio, repeats=args.repeats, runs=[])
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        work = Path(work)
        common = ["--out", str(args.out), "--size", str(args.size), "--batch", str(args.batch), "--repeats",
                  str(args.repeats), "--model", args.model, "--calib-size", str(args.calib_size), "--ratio",
                  str(args.ratio)]
        # each heavy step in its own process: a 10 GB fp32 UNet held by this one would not leave room for the next
        done = subprocess.run([sys.executable, __file__, *common, "--prepare", str(work)], stdout=subprocess.PIPE,
                              text=True, check=True)
        prepared = json.loads(done.stdout)
        from toma_export.quantize import Quantization

        folder, quant = Path(prepared["folder"]), Quantization(**prepared["quant"])
        for variant in VARIANTS:
            path = _export(args, folder, work, variant, quant)
            _say(f"timing {variant} ({args.repeats} steps after a warm-up, in its own process)")
            done = subprocess.run([sys.executable, __file__, *common, "--time", path, variant],
                                  stdout=subprocess.PIPE, text=True, check=True)
            result["runs"].append(dict(variant=variant, **json.loads(done.stdout)))
    base = result["runs"][0]["step_s"]
    speed = {r["variant"]: base / r["step_s"] for r in result["runs"]}
    product = speed["toma"] * speed["int8"]
    result.update(speedups={k: round(v, 3) for k, v in speed.items()}, product=round(product, 3),
                  share_of_product=round(speed["int8+toma"] / product, 3),
                  multiplies=speed["int8+toma"] >= 0.9 * product)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


def _say(msg: str) -> None:
    print(f"[quant_speed] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def _prepare(args, work: Path) -> dict:
    """In a fresh process: the random-weight folder and its INT8 scales (calibrated with ToMA on), as the
    fields of a quantize.Quantization."""
    import hashlib

    import torch
    from safetensors.torch import save_file

    from toma_export import models
    from toma_export.calibration import module_scales
    from toma_export.models import real_configs
    from toma_export.quantize import Quantization
    from toma_export.toma import ToMAConfig, apply_toma

    _say(f"writing {args.model} with random weights")
    folder = real_configs.write(args.model, work / args.model)
    spec = models.get(str(folder))
    _say(f"calibrating int8 at {args.calib_size}x{args.calib_size} px with ToMA {args.ratio} on (modelopt)")
    t0 = time.perf_counter()
    net = spec.load(torch.float32)
    apply_toma(net, ToMAConfig(ratio=args.ratio))
    inputs = spec.sample_inputs(spec.cfg_batch(spec.default_guidance), args.calib_size, args.calib_size, 0,
                                smooth=True)
    scales = module_scales(net, "int8", lambda n: n(**inputs, return_dict=False), skip=spec.quant_skip)
    del net
    path = work / "scales.safetensors"
    save_file(scales, str(path), metadata=dict(mode="int8", level="3.0", model=spec.name))
    _say(f"calibrated {sum(k.endswith('.input_scale') for k in scales)} layers in {time.perf_counter() - t0:.0f} s")
    quant = Quantization("int8", "3.0", str(path), hashlib.sha256(path.read_bytes()).hexdigest()[:12])
    return dict(folder=str(folder), quant=dict(mode=quant.mode, level=quant.level, scales=quant.scales,
                                               digest=quant.digest))


def _export(args, folder: Path, work: Path, variant: str, quant) -> str:
    from toma_export.onnx import ExportOptions, export_in_child
    from toma_export.toma import ToMAConfig

    _say(f"exporting {variant}")
    config = ToMAConfig(ratio=args.ratio) if "toma" in variant else None
    options = ExportOptions(height=args.size, width=args.size, batch=args.batch, dtype="fp32",
                            quant=quant if variant.startswith("int8") else None)
    meta = export_in_child(str(folder), config, work / "onnx", options, progress=lambda m: None)
    return meta["onnx"]


def _time(path: str, args) -> dict:
    """In a fresh process: load the session, feed the family's sample inputs (destinations selected on the
    step), one warm-up step, then the median of `repeats` steps."""
    import statistics

    import numpy as np
    import torch

    from toma_export.artifacts import Artifact
    from toma_export.runtime.onnxruntime import load_session, session_options
    from toma_export import models

    artifact = Artifact.load(path, "onnx")
    spec = models.get(artifact.model)
    t0 = time.perf_counter()
    session = load_session(path, session_options(torch.get_num_threads()), ["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    given = {k: v.numpy() for k, v in spec.graph_inputs(args.batch, args.size, args.size, 0, smooth=True).items()}
    feed = {}
    for i in session.get_inputs():
        if i.name in given:
            feed[i.name] = given[i.name]
        elif i.name.startswith("toma_dst."):
            feed[i.name] = np.zeros(i.shape, np.int64)
        elif i.name == "toma_recompute":
            feed[i.name] = np.ones([1], np.int32)
    session.run(None, feed)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    import resource

    return dict(onnx=path, load_s=round(load_s, 1), step_s=round(statistics.median(times), 3),
                steps_s=[round(t, 3) for t in times],
                peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                integer_kernels=bool(artifact.meta.get("quantize")))


if __name__ == "__main__":
    raise SystemExit(main())
