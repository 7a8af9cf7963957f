"""`toma-export demo`: patch a model with ToMA and time it against the unpatched one, in PyTorch."""
from __future__ import annotations

import json
import statistics
import sys
import time

from .common import MODEL_HELP, add_json, add_toma_options, peak_memory, peak_memory_line, size, toma_config


def add_parser(sub):
    p = sub.add_parser("demo", help="patch a tiny model with ToMA and time it against the unpatched one")
    p.add_argument("--model", default="flux-tiny", help=f"{MODEL_HELP} (flux-tiny)")
    p.add_argument("--size", type=size, default=(1024, 1024),
                   help="HEIGHTxWIDTH in pixels (1024x1024: the real models' token counts, 4096 image tokens)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per variant (median reported)")
    add_json(p)
    add_toma_options(p)
    return p


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(args) -> int:
    import torch

    from .. import models
    from ..toma import apply_toma, remove_toma, reset_toma
    from ..toma.tiles import check_tiling

    torch.set_grad_enabled(False)
    config = toma_config(args)
    spec = models.get(args.model)
    height, width = spec.size(*args.size)
    check_tiling(spec.token_grid(height, width), config.tile)
    print(f"[1/3] loading {spec.name} ...", file=sys.stderr)
    model = spec.load()
    inputs = spec.sample_inputs(batch=args.batch, height=height, width=width, smooth=True)
    forward = lambda: model(**inputs, return_dict=False)[0]  # noqa: E731
    print(f"[2/3] timing the unpatched forward at {height}x{width} px, batch {args.batch} ...", file=sys.stderr)
    ref = forward()
    base_ms = _median_ms(forward, args.repeats)
    report = apply_toma(model, config)

    def forward_toma():
        reset_toma(model)                  # every timed call is step 0: selection + merge weights included
        return forward()

    print(f"[3/3] timing the ToMA forward ({len(report.blocks)} blocks patched) ...", file=sys.stderr)
    out = forward_toma()
    toma_ms = _median_ms(forward_toma, args.repeats)
    remove_toma(model)
    err = ((out - ref).norm() / ref.norm()).item()
    result = dict(model=spec.name, height=height, width=width, batch=args.batch, tokens=spec.token_grid(height, width),
                  patched_blocks=report.blocks, groups=list(report.groups), ratio=config.ratio, tile=list(config.tile),
                  unpatched_ms=round(base_ms, 2), toma_ms=round(toma_ms, 2), speedup=round(base_ms / toma_ms, 3),
                  relative_error=round(err, 5), repeats=args.repeats, torch_threads=torch.get_num_threads(),
                  **peak_memory())
    if args.json:
        print(json.dumps(result))
        return 0
    print(report)
    print(f"\nforward of {spec.name} at {height}x{width} px ({result['tokens'][0]}x{result['tokens'][1]} image tokens), "
          f"batch {args.batch}, median of {args.repeats} on CPU ({result['torch_threads']} threads):")
    print(f"  unpatched  {base_ms:9.2f} ms")
    print(f"  ToMA       {toma_ms:9.2f} ms   ({result['speedup']:.2f}x; includes selection and merge weights)")
    print(f"  output change vs unpatched: {err:.2%} relative L2 (smooth latent input)")
    print(f"  {peak_memory_line(result)}")
    return 0
