"""Whole-network speed per denoising step at each merge ratio on the real-size configurations (random weights):
the full SDXL base UNet at 1024x1024 with ToMA on level 1 and on levels 1-2, and FLUX.1-dev cut to 2+4 blocks
at 1024x1024; and that FLUX with First-Block Cache (time per computed and per cached step; the random weights make
its skip decisions arbitrary, so only the step times mean anything). Each runs `toma-export sweep --metrics none`
(PyTorch, fp32, the family's loop) in its own process, so every figure is a ratio measured in one run on one
machine. Prints one JSON object and writes it to --out.

    python scripts/sweep_real.py --out docs/quality/real/real-size.json    # about 8 minutes on 2 cores
    python scripts/sweep_real.py --only flux-cache --out docs/quality/real/flux-dev-cache.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RUNS = {  # name: (label, model, blocks, sweep options); the default runs are the first three
    "sdxl-level1": ("SDXL base UNet, ToMA on level 1 (64x64, the default)", "sdxl-base", None, []),
    "sdxl-levels2": ("SDXL base UNet, ToMA on levels 1-2 (64x64 and 32x32)", "sdxl-base", None, ["--levels", "2"]),
    "flux": ("FLUX.1-dev 2+4 blocks", "flux-dev", (2, 4), []),
    "flux-cache": ("FLUX.1-dev 2+4 blocks, First-Block Cache", "flux-dev", (2, 4),
                   ["--cache", "none,fbcache:0.7", "--steps", "4"]),
}
DEFAULT = ("sdxl-level1", "sdxl-levels2", "flux")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ratios", default="0,0.5")
    p.add_argument("--steps", type=int, default=1, help="denoising steps per ratio, after one warm-up step (1)")
    p.add_argument("--size", default="1024x1024")
    p.add_argument("--work", type=Path, help="folder for the model folders (default: a temporary one)")
    p.add_argument("--only", default=",".join(DEFAULT), help=f"comma list of runs, from {', '.join(RUNS)} "
                   f"({','.join(DEFAULT)})")
    args = p.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        p.error(f"--only takes names from {', '.join(RUNS)}, got {args.only!r}")
    from toma_export.bench.run import cpu_name
    from toma_export.models import real_configs

    results = dict(machine=cpu_name(), size=args.size, steps=args.steps, dtype="fp32", runs=[])
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        folders = {}
        for label, model, blocks, options in (RUNS[n] for n in names):
            key = (model, blocks)
            if key not in folders:
                print(f"[sweep_real] writing {model} {blocks or 'full'} (random weights)", file=sys.stderr, flush=True)
                folders[key] = real_configs.write(model, Path(work) / f"{model}-{blocks}", blocks=blocks)
            out = Path(work) / f"sweep-{len(results['runs'])}"
            cmd = [sys.executable, "-m", "toma_export.cli", "sweep", "--model", str(folders[key]), "--metrics", "none",
                   "--ratios", args.ratios, "--steps", str(args.steps), "--size", args.size, "--prompt", "timing",
                   "--out", str(out), "--json", *options]
            print(f"[sweep_real] {label}", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
            results["runs"].append(dict(label=label, model=model, blocks=blocks, options=options,
                                        rows=json.loads(done.stdout)["rows"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
