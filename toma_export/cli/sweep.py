"""`toma-export sweep`: speed and quality at each merge ratio, with pictures (sweep.json, pareto.png, grid.png,
report.html)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import (MODEL_HELP, add_cache, add_json, add_quantize, add_toma_options, progress, size, stdout_on_stderr,
                     toma_options)


def ratios(text: str) -> tuple:
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratios must be a comma list of shares, e.g. 0,0.25,0.5,0.75, got {text!r}")


def add_parser(sub):
    p = sub.add_parser("sweep", help="speed and quality at each merge ratio (and step cache), with "
                                        "pictures")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--ratios", type=ratios, default=(0.0, 0.25, 0.5, 0.75),
                   help="merge ratios, comma list (0,0.25,0.5,0.75); 0 is always run: the reference")
    p.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"], default="torch",
                   help="torch: the patched PyTorch network (default); onnxruntime/tensorrt: exported graphs or "
                        "engines, one per ratio, exported or built on first use")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; default: every caption "
                         "of the shapes grammar for tiny models, four stock prompts otherwise)")
    prompts.add_argument("--prompts", type=Path, help="a text file, one prompt per line")
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt (1): images = prompts x seeds per ratio")
    p.add_argument("--steps", type=int, default=28, help="denoising steps (28)")
    p.add_argument("--size", type=size, help="HEIGHTxWIDTH in pixels (the model's default)")
    p.add_argument("--guidance", type=float, help="guidance scale (the family's default)")
    p.add_argument("--metrics", choices=["judge", "clip", "none"],
                   help="judge: the shapes judge (tiny models' default); clip: CLIP-T and DINO (real models' "
                        "default, needs --clip and --dino); none: speed only")
    p.add_argument("--clip", help="a CLIP model (local folder or hub id in the cache) for CLIP-T")
    p.add_argument("--dino", help="a DINOv2 model (local folder or hub id in the cache) for DINO fidelity")
    p.add_argument("--grid-prompts", type=int, default=8, help="prompts shown as rows of grid.png (8)")
    p.add_argument("--output-dir", help="export / engine cache for onnxruntime and tensorrt (the default cache)")
    p.add_argument("--out", required=True, help="folder for sweep.json, pareto.png, grid.png and report.html")
    p.add_argument("--controlnet", metavar="NAME|FOLDER",
                   help="a ControlNet of the tiny model (sdxl-tiny-controlnet, flux-tiny-controlnet): every image "
                        "follows a held-out sample's outline, with its caption, and the rows gain the judge's control "
                        "IoU and centroid distance; ToMA patches network and ControlNet alike (torch backend)")
    p.add_argument("--controls", type=int, default=24, metavar="N",
                   help="with --controlnet: held-out samples drawn per ratio, one seed each (24)")
    add_cache(p, many=True)
    add_json(p, "the table")
    add_quantize(p, many=True)
    add_toma_options(p)
    return p


def run(args) -> int:
    from ..errors import UsageError
    from ..quality.sweep import SweepRequest, sweep, write

    options = toma_options(args)
    if "ratio" in options:
        raise UsageError("sweep takes --ratios (a list), not --ratio")
    prompts = tuple(args.prompt)
    if args.prompts:
        if not args.prompts.is_file():
            raise UsageError(f"--prompts {args.prompts}: no such file (one prompt per line)")
        prompts = tuple(line.strip() for line in args.prompts.read_text().splitlines() if line.strip())
        if not prompts:
            raise UsageError(f"--prompts {args.prompts} holds no prompt (one per line)")
    request = SweepRequest(model=args.model, ratios=args.ratios, backend=args.backend, prompts=prompts,
                           seeds=args.seeds, steps=args.steps, size=args.size, guidance=args.guidance,
                           metrics=args.metrics, clip=args.clip, dino=args.dino, toma=options,
                           output_dir=args.output_dir, grid_prompts=args.grid_prompts, caches=args.cache,
                           quantizes=args.quantize, quant_level=args.quant_level, calib_prompts=args.calib_prompts,
                           calib_steps=args.calib_steps, controlnet=args.controlnet,
                           controls=args.controls)
    with stdout_on_stderr():
        result = sweep(request, progress, quiet=args.json)
        files = write(result, Path(args.out), args.grid_prompts)
    rows = result["rows"]
    if args.json:
        print(json.dumps({"rows": rows, "files": files, "metric_names": result["metric_names"]}))
    else:
        print(_table(result, files))
    return 0


def _table(result: dict, files: dict) -> str:
    from ..quality.report import cell, columns

    rows = result["rows"]
    cols = columns(rows)
    lines = [f"{result['model']} on {result['backend']}, {result['height']}x{result['width']} px, {result['steps']} "
             f"steps, {len(result['prompts'])} prompts x {result['seeds']} seed(s)",
             "  ".join(f"{label:>14}" for _, label, _ in cols)]
    for r in rows:
        lines.append("  ".join(f"{cell(r, k, fmt):>14}" for k, _, fmt in cols))
    lines += [f"  {k}: {v}" for k, v in result["metric_names"].items()]
    lines.append("  " + "  ".join(files.values()))
    return "\n".join(lines)
