"""`toma-export` command line. Subcommands import their heavy modules lazily."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import time


@contextlib.contextmanager
def stdout_on_stderr():
    """Native libraries (TensorRT's logger) write to file descriptor 1: point it at stderr while they run, so
    stdout carries only our own output (the --json object)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _size(text: str) -> tuple[int, int]:
    """'1024x768' -> (height=1024, width=768)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"size must look like HEIGHTxWIDTH in pixels, e.g. 1024x768, got {text!r}")
    return int(parts[0]), int(parts[1])


def _tile(text: str) -> tuple[int, int]:
    """'4x8' -> (4, 8); '4' -> (4, 4)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"tile must look like ROWSxCOLS in tokens, e.g. 4x4, got {text!r}")
    return int(parts[0]), int(parts[-1])


def add_toma_options(p: argparse.ArgumentParser, defaults: str = "") -> None:
    p.add_argument("--ratio", type=float, help=f"share of image tokens merged away, in [0, 1) ({defaults or '0.5'})")
    p.add_argument("--tile", type=_tile, help=f"tile shape in tokens, ROWSxCOLS ({defaults or '4x4'})")
    p.add_argument("--scale", type=float, help=f"merge softmax sharpness on cosines ({defaults or '1000'})")


def toma_config(args, base: dict | None = None):
    """ToMAConfig from the command line, falling back to `base` (a recipe's toma section), then defaults."""
    from .toma import ToMAConfig

    values = dict(base or {})
    for name in ("ratio", "tile", "scale"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return ToMAConfig(**values)                 # ToMAConfig normalises a recipe's [4, 4] tile itself


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cmd_demo(args) -> int:
    """Patch a tiny model, time patched vs unpatched forwards, report what changed."""
    import torch

    from . import models
    from .toma import apply_toma, remove_toma, reset_toma
    from .toma.tiles import check_tiling

    torch.set_grad_enabled(False)
    config = toma_config(args)
    spec = models.get(args.model)
    height, width = spec.size(*args.size)
    check_tiling(spec.token_grid(height, width), config.tile)
    print(f"[1/3] loading {spec.name} ...", file=sys.stderr)
    model = spec.load()
    inputs = spec.sample_inputs(batch=args.batch, height=height, width=width, smooth=True)
    run = lambda: model(**inputs, return_dict=False)[0]  # noqa: E731
    print(f"[2/3] timing the unpatched forward at {height}x{width} px, batch {args.batch} ...", file=sys.stderr)
    ref = run()
    base_ms = _median_ms(run, args.repeats)
    report = apply_toma(model, config)

    def run_toma():
        reset_toma(model)                  # every timed call is step 0: selection + merge weights included
        return run()

    print(f"[3/3] timing the ToMA forward ({len(report.blocks)} blocks patched) ...", file=sys.stderr)
    out = run_toma()
    toma_ms = _median_ms(run_toma, args.repeats)
    remove_toma(model)
    err = ((out - ref).norm() / ref.norm()).item()
    result = dict(model=spec.name, height=height, width=width, batch=args.batch, tokens=spec.token_grid(height, width),
                  patched_blocks=report.blocks, groups=list(report.groups), ratio=config.ratio, tile=list(config.tile),
                  unpatched_ms=round(base_ms, 2), toma_ms=round(toma_ms, 2), speedup=round(base_ms / toma_ms, 3),
                  relative_error=round(err, 5), repeats=args.repeats, torch_threads=torch.get_num_threads())
    if args.json:
        print(json.dumps(result))
        return 0
    print(report)
    print(f"\nforward of {spec.name} at {height}x{width} px ({result['tokens'][0]}x{result['tokens'][1]} image tokens), "
          f"batch {args.batch}, median of {args.repeats} on CPU ({result['torch_threads']} threads):")
    print(f"  unpatched  {base_ms:9.2f} ms")
    print(f"  ToMA       {toma_ms:9.2f} ms   ({result['speedup']:.2f}x; includes selection and merge weights)")
    print(f"  output change vs unpatched: {err:.2%} relative L2 (smooth latent input)")
    return 0


def cmd_export(args) -> int:
    """Export the ToMA-patched network to ONNX (reusing an identical earlier export)."""
    from . import models
    from .onnx import ExportOptions, export
    from .toma.tiles import check_tiling

    config = toma_config(args)
    spec = models.get(args.model)
    check_tiling(spec.token_grid(args.height, args.width), config.tile)     # before any heavy loading
    options = ExportOptions(height=args.height, width=args.width, batch=args.batch, dynamic=args.dynamic,
                            dtype=args.dtype, opset=args.opset, min_size=args.min_size, max_size=args.max_size)
    meta = export(args.model, config, args.output_dir, options, force=args.force)
    if args.json:
        print(json.dumps(meta))
        return 0
    kind = (f"dynamic: batch {meta['ranges']['batch'][0]}-{meta['ranges']['batch'][2]}, sizes "
            f"{'x'.join(map(str, meta['ranges']['sizes'][0]))} to {'x'.join(map(str, meta['ranges']['sizes'][2]))} px"
            if meta["dynamic"] else f"static: batch {meta['batch']}, {meta['height']}x{meta['width']} px")
    print(f"{meta['onnx']}\n  {meta['model']} {meta['dtype']} opset {meta['opset']}, {kind}")
    toma = meta["toma"]
    print(f"  ToMA ratio {toma['ratio']}, tile {toma['tile'][0]}x{toma['tile'][1]}, {toma['destinations_per_tile']} "
          f"destinations per tile, {toma['selection_nodes']} toma::ToMASelect node(s)")
    for io in ("inputs", "outputs"):
        print(f"  {io}:")
        for v in meta[io]:
            print(f"    {v['name']:<44} {v['dtype']:<8} {v['shape']}")
    return 0


def add_export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="flux, sdxl, flux-tiny, sdxl-tiny or a local diffusers folder")
    add_toma_options(p)
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's default size)")
    p.add_argument("--width", type=int, help="image width in pixels")
    p.add_argument("--batch", type=int, default=1, help="static batch (CFG counts twice) (1)")
    p.add_argument("--dynamic", action="store_true",
                   help="one file valid across the model's batch, size and text-length ranges")
    p.add_argument("--min-size", type=_size, help="dynamic: smallest HEIGHTxWIDTH (default: the model's range)")
    p.add_argument("--max-size", type=_size, help="dynamic: largest HEIGHTxWIDTH")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="weights and activations (SDXL engines: fp16, FLUX: bf16) (fp32)")
    p.add_argument("--opset", type=int, default=20, help="ONNX opset, 17-22 (20)")
    p.add_argument("--output-dir", required=True, help="artifacts go to a keyed subfolder of this folder")
    p.add_argument("--force", action="store_true", help="export again even if an identical export exists")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")


def cmd_build(args) -> int:
    """Export (or reuse) the ONNX file and build a TensorRT / TensorRT-RTX engine from it."""
    from .trt import BuildOptions, build, recipe

    plan = recipe(args.model)
    config = None if args.no_toma else toma_config(args, plan["toma"])
    options = BuildOptions(backend=args.backend, target=args.target, dtype=args.dtype, min_size=args.min_size,
                           opt_size=args.opt_size, max_size=args.max_size, static=args.static,
                           timing_cache=args.timing_cache, verbose=args.verbose, selection=args.selection,
                           ptx_version=args.ptx_version)
    with stdout_on_stderr():
        meta = build(args.model, config, args.output_dir, options, force=args.force)
    if args.json:
        print(json.dumps(meta))
        return 0
    print(f"{meta['engine']}\n  {meta['model']} {meta['dtype']}, {meta['backend']} {meta['backend_version']}"
          f"{' for ' + meta['target'] if meta['target'] else ''}, {'dynamic profile' if meta['dynamic'] else 'static'}, "
          f"{meta['engine_bytes'] / 2**20:.1f} MiB, built in {meta['build_seconds']:.0f} s")
    print(f"  selection: {meta['selection']} ({meta.get('selection_reason', '')})")
    print(f"  onnx: {meta['onnx']}")
    for name, shapes in (meta["profiles"] or {}).items():
        print(f"    {name:<44} min {shapes['min']}  opt {shapes['opt']}  max {shapes['max']}")
    return 0


def _sizes(text: str) -> tuple:
    return tuple(_size(part) for part in text.split(","))


def cmd_validate(args) -> int:
    """Compare backends against the fp32 PyTorch ToMA reference; exit 0 only when everything passes."""
    from .parity import ValidateOptions, table, validate, write_report

    backends = tuple(b.strip() for b in args.backends.split(","))
    options = ValidateOptions(backends=backends, dtype=args.dtype, sizes=args.sizes, steps=args.steps,
                              batch=args.batch, atol=args.atol, rtol=args.rtol, onnx=args.onnx, engine=args.engine,
                              output_dir=args.output_dir, save_reference=args.save_reference,
                              load_reference=args.load_reference, bisect=args.bisect)
    with stdout_on_stderr():
        report = validate(args.model, None if args.no_toma else toma_config(args), options)
    if args.report:
        files = write_report(report, args.report)
        print(f"[validate] report written: {', '.join(files)}", file=sys.stderr)
    print(json.dumps(report) if args.json else table(report))
    return 0 if report["passed"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toma-export", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is patched and built")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="patch a tiny model with ToMA and time it against the unpatched one")
    demo.add_argument("--model", default="flux-tiny", help="flux-tiny, sdxl-tiny, flux, sdxl or a local folder")
    demo.add_argument("--size", type=_size, default=(1024, 1024),
                      help="HEIGHTxWIDTH in pixels (1024x1024: the real models' token counts, 4096 image tokens)")
    demo.add_argument("--batch", type=int, default=1)
    demo.add_argument("--repeats", type=int, default=5, help="timed forwards per variant (median reported)")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    add_toma_options(demo)
    demo.set_defaults(func=cmd_demo)
    exp = sub.add_parser("export", help="export the ToMA-patched network to ONNX (selection as toma::ToMASelect)")
    add_export_options(exp)
    exp.set_defaults(func=cmd_export)

    bld = sub.add_parser("build", help="build a TensorRT (plugin) or TensorRT-RTX (inlined body) engine")
    bld.add_argument("--model", required=True, help="flux, sdxl, flux-tiny, sdxl-tiny or a local diffusers folder")
    bld.add_argument("--backend", choices=["tensorrt", "tensorrt-rtx"],
                     help="default: tensorrt where it imports, else tensorrt-rtx")
    bld.add_argument("--target", help="TensorRT-RTX compute capability to build for, e.g. sm86, sm89, sm120 (sm89)")
    bld.add_argument("--selection", choices=["auto", "plugin", "body"], default="auto",
                     help="what runs the destination selection: the toma::ToMASelect plugin (TensorRT 10.9+ and a "
                          "CUDA GPU), the inlined ONNX body, or auto: the plugin where it can run, else the body (auto)")
    bld.add_argument("--ptx-version", type=int, metavar="N",
                     help="PTX ISA of the plugin's kernel, e.g. 84 for 8.4 (default: what the installed driver loads; "
                          "8.4 where none can be read)")
    add_toma_options(bld, defaults="recipe")
    bld.add_argument("--no-toma", action="store_true", help="build the baseline engine without ToMA")
    bld.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: the recipe's (FLUX bf16, SDXL fp16)")
    for which in ("min", "opt", "max"):
        bld.add_argument(f"--{which}-size", type=_size, help=f"{which} HEIGHTxWIDTH of the profile (recipe)")
    bld.add_argument("--static", action="store_true", help="one shape (the opt size, batch 1) instead of a profile")
    bld.add_argument("--timing-cache", help="TensorRT timing cache file, read and updated")
    bld.add_argument("--output-dir", help="artifacts go to keyed subfolders (engines/out)")
    bld.add_argument("--force", action="store_true", help="export and build again even if cached")
    bld.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    bld.set_defaults(func=cmd_build)

    val = sub.add_parser("validate", help="accuracy parity of ONNX Runtime / TensorRT against the PyTorch reference")
    val.add_argument("--model", required=True, help="flux, sdxl, flux-tiny, sdxl-tiny or a local diffusers folder")
    val.add_argument("--onnx", help="an exported model.onnx (default: export one, or reuse the cached export)")
    val.add_argument("--engine", help="a built engine's engine.json (default: build one when tensorrt is asked for)")
    val.add_argument("--backends", default="torch,onnxruntime",
                     help="comma list from torch (the fp32 reference; also a candidate in --dtype), onnxruntime, "
                          "tensorrt (torch,onnxruntime)")
    val.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="candidates' dtype (fp32)")
    val.add_argument("--sizes", type=_sizes, help="comma list of HEIGHTxWIDTH (the model's default size)")
    val.add_argument("--steps", type=int, default=0, help="also run a whole denoising loop of N steps (0: one step)")
    val.add_argument("--batch", type=int, default=2, help="batch of the sample inputs (2)")
    val.add_argument("--atol", type=float, help="absolute tolerance (default 0)")
    val.add_argument("--rtol", type=float, help="tolerance relative to the output scale (default by dtype: fp32 "
                                                "1e-4 per step / 1e-3 over a loop, fp16 2e-2 / 5e-2, bf16 5e-2 / 1e-1)")
    add_toma_options(val)
    val.add_argument("--no-toma", action="store_true", help="validate the network without ToMA")
    val.add_argument("--output-dir", help="where exports and engines are cached (engines/out)")
    val.add_argument("--save-reference", metavar="F", help="store inputs and fp32 reference outputs in F (.npz)")
    val.add_argument("--load-reference", metavar="F", help="compare candidates against a stored reference "
                                                          "(e.g. made on another machine) instead of running PyTorch")
    val.add_argument("--report", metavar="DIR", help="write report.json, report.txt and errors.png there")
    val.add_argument("--bisect", action="store_true",
                     help="when ONNX Runtime fails a step, name the first transformer block out of tolerance")
    val.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    val.set_defaults(func=cmd_validate)

    # benchmarks and serving define their own subcommands (argparse only at import; heavy imports in the commands)
    from .bench import cli as bench_cli
    from .serve import cli as serve_cli, repository

    bench_cli.add_parser(sub)
    serve_cli.add_parser(sub)
    repository.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError, OSError) as err:
        print(f"toma-export: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
