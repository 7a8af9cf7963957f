"""`toma-export bench` (also scripts/bench.py): ToMA against the baseline and tomesd per block and backend."""
from __future__ import annotations

import json
import sys

from ..errors import UsageError
from .common import add_json, peak_memory, peak_memory_line, quant_modes, stdout_on_stderr


def _floats(text: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--ratios must be a comma list of numbers in [0, 1), e.g. 0.25,0.5,0.75, got {text!r}") \
            from None


def add_parser(sub):
    p = sub.add_parser("bench", help="time ToMA against the baseline and tomesd per block and backend (JSON, "
                                     "table, plot)")
    p.add_argument("--ratios", default="0.25,0.5,0.75", help="ToMA ratios to time (0.25,0.5,0.75)")
    p.add_argument("--blocks", default="sdxl,flux", help="comma list from sdxl, flux (both)")
    p.add_argument("--backends", default="torch,onnxruntime", help="comma list from torch, onnxruntime (both)")
    p.add_argument("--models", default="flux-tiny,sdxl-tiny",
                   help="whole tiny models to time end to end in PyTorch ('' for none)")
    p.add_argument("--model-size", type=int, default=1024, help="pixel side for the whole models (1024)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per variant, median reported (7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (1)")
    p.add_argument("--flux-width", type=int, default=3072,
                   help="FLUX block width, a multiple of 128 (3072, FLUX.1's own; smaller only for quick checks)")
    p.add_argument("--grid", type=int, default=64, help="image-token grid side (64 = 1024x1024 px); smaller only "
                                                        "for quick checks")
    p.add_argument("--text", type=int, default=512, help="FLUX text tokens (512)")
    p.add_argument("--no-peer", action="store_true", help="skip tomesd")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: fp16 or bf16 blocks and parts in PyTorch (SDPA), Triton vs PyTorch selection, TensorRT "
                        "engines")
    p.add_argument("--gpu-dtype", choices=["fp16", "bf16"], default="fp16",
                   help="with --device cuda: the blocks' half precision (fp16)")
    p.add_argument("--out", help="folder for results.json, results.md and latency.png")
    p.add_argument("--readme", help="also put the table and plot into this markdown page between the bench markers "
                                   "(docs/bench.md; make bench passes it)")
    add_json(p, "the table")
    p.add_argument("--quantize", type=quant_modes, default=("none",), metavar="MODES",
                   help="none or int8: also time each block INT8 and INT8 + ToMA on ONNX Runtime's integer kernels "
                        "(calibrated by modelopt), the four-way table of docs/quantize.md (none)")
    return p


def run(args) -> int:
    from pathlib import Path

    from ..bench import report
    from ..bench.run import BenchOptions, run as run_bench

    if args.repeats < 1 or args.warmup < 0:
        raise UsageError("--repeats must be >= 1 and --warmup >= 0")
    if args.readme and not args.out:
        raise UsageError("--readme needs --out (the plot the page shows is written there)")
    if args.readme:
        report.check_readme(Path(args.readme))
    split = lambda text: tuple(v.strip() for v in text.split(",") if v.strip())  # noqa: E731
    options = BenchOptions(ratios=_floats(args.ratios), blocks=split(args.blocks), backends=split(args.backends),
                           repeats=args.repeats, warmup=args.warmup, flux_width=args.flux_width, grid=args.grid,
                           text=args.text, peer=not args.no_peer, models=split(args.models), model_size=args.model_size,
                           device=args.device, gpu_dtype=args.gpu_dtype,
                           quantize=tuple(m for m in args.quantize if m != "none"))
    with stdout_on_stderr():            # TensorRT's logger writes to fd 1, which carries the --json object alone
        doc = run_bench(options)
    if args.out:
        files = report.write(doc, Path(args.out))
        if args.readme:
            report.update_readme(Path(args.readme), doc, files[2])
        print(f"[bench] wrote {', '.join(str(f) for f in files)}" + (f" and {args.readme}" if args.readme else ""),
              file=sys.stderr)
    peak = peak_memory()
    print(f"[bench] {peak_memory_line(peak)}", file=sys.stderr)
    print(json.dumps({**doc, **peak}, indent=2) if args.json else report.table(doc))
    return 0
