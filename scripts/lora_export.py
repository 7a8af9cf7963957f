"""What a LoRA export costs against the first export of a model: a real-width FLUX.1-dev folder (random bf16
weights, cut to --blocks), exported once (trace + weights), then with a diffusers-format LoRA over every
attention projection, then with a kohya-format LoRA (fused qkv, as kohya's trainer writes it), each a
`toma-export export --json` in its own process; the series runs twice, weights copied into model.onnx.data
and with --link-weights. Prints one JSON object: seconds, peak RSS, bytes written and file sizes.

    python scripts/lora_export.py --blocks 4+8 --rank 16
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from toma_export.bench.run import BenchOptions, machine

from real_models import write_in_child          # scripts/: the folder is written in a child process


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", default="4+8", help="FLUX.1-dev depth, double+single (4+8)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (16)")
    p.add_argument("--size", default="1024x1024", help="export size (1024x1024)")
    p.add_argument("--modes", default="copied,linked",
                   help="series to run: copied (weights into model.onnx.data), linked (--link-weights) (both)")
    p.add_argument("--work", default="/tmp/toma-lora-export", help="folder for the model, LoRAs and exports")
    args = p.parse_args(argv)
    double, single = (int(n) for n in args.blocks.split("+"))
    work = Path(args.work)
    folder = work / f"flux-dev-{double}+{single}"
    if not (folder / "model_index.json").is_file():
        print(f"[lora] writing {folder} (random bf16 weights, real FLUX.1-dev config)", file=sys.stderr)
        write_in_child("flux-dev", folder, (double, single), None, streamed=True)   # its memory is not ours
    width = 3072
    peft_file = _diffusers_lora(work / "peft.safetensors", double, single, width, args.rank)
    kohya_file = _kohya_lora(work / "kohya.safetensors", double, width, args.rank)
    height, w = args.size.split("x")
    runs = {}
    modes = {"copied": [], "linked": ["--link-weights"]}
    unknown = set(args.modes.split(",")) - set(modes)
    if unknown:
        p.error(f"--modes takes copied and/or linked, got {', '.join(sorted(unknown))}")
    for mode, flags in ((m, modes[m]) for m in args.modes.split(",")):
        out_dir = work / f"out-{mode}"
        shutil.rmtree(out_dir, ignore_errors=True)       # every series starts from no export: its first one traces
        for name, extra in (("first export", []), ("diffusers LoRA", ["--lora", f"{peft_file}:0.8"]),
                            ("kohya LoRA", ["--lora", str(kohya_file)])):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "toma_export.cli", "export", "--model", str(folder),
                                  "--height", height, "--width", w, "--output-dir", str(out_dir), *flags, *extra,
                                  "--json"], capture_output=True, text=True)
            if out.returncode:
                print(out.stderr, file=sys.stderr)
                return 1
            meta = json.loads(out.stdout)
            runs[f"{name}, weights {mode}"] = dict(
                seconds=round(time.perf_counter() - t0, 1), export_seconds=meta["export_seconds"],
                peak_rss_gb=meta["peak_rss_gb"], traced=not meta.get("graph_from"),
                weights_gib=round(meta["weights"]["bytes"] / 2**30, 2),
                written_gib=round(meta["weights"]["written"] / 2**30, 3),
                onnx_mib=round(Path(meta["onnx"]).stat().st_size / 2**20, 1))
            print(f"[lora] {name}, weights {mode}: {runs[f'{name}, weights {mode}']}", file=sys.stderr)
    result = dict(machine=machine(BenchOptions()), blocks=args.blocks, rank=args.rank, size=args.size, runs=runs,
                  lora_mib={f.name: round(f.stat().st_size / 2**20, 1) for f in (peft_file, kohya_file)})
    print(json.dumps(result, indent=1))
    return 0


def _diffusers_lora(path: Path, double: int, single: int, width: int, rank: int) -> Path:
    """Every attention projection of every block, in the diffusers/peft key format."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    names = [f"transformer_blocks.{i}.attn.{m}" for i in range(double)
             for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
    names += [f"single_transformer_blocks.{i}.attn.{m}" for i in range(single) for m in ("to_q", "to_k", "to_v")]
    tensors = {}
    for name in names:
        tensors[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, width, generator=g) * 0.01).bfloat16()
        tensors[f"transformer.{name}.lora_B.weight"] = (torch.randn(width, rank, generator=g) * 0.01).bfloat16()
    save_file(tensors, str(path))
    return path


def _kohya_lora(path: Path, double: int, width: int, rank: int) -> Path:
    """The image stream's fused qkv of every double block, in kohya's key format (BFL module names)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(double):
        name = f"lora_unet_double_blocks_{i}_img_attn_qkv"
        tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, width, generator=g) * 0.01).bfloat16()
        tensors[f"{name}.lora_up.weight"] = (torch.randn(3 * width, rank, generator=g) * 0.01).bfloat16()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path


if __name__ == "__main__":
    sys.exit(main())
