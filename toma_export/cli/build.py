"""`toma-export build`: export (or reuse) the ONNX file and build a TensorRT / TensorRT-RTX engine."""
from __future__ import annotations

import json
from pathlib import Path

from .common import (MODEL_HELP, add_cache, add_controlnet, add_json, add_lora, add_quantize, add_toma_options,
                     peak_memory, peak_memory_line, quantization, size, stdout_on_stderr, toma_config)


def add_parser(sub):
    p = sub.add_parser("build", help="build a TensorRT (plugin) or TensorRT-RTX (inlined body) engine")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--backend", choices=["tensorrt", "tensorrt-rtx"],
                   help="default: tensorrt where it imports, else tensorrt-rtx")
    p.add_argument("--target", help="TensorRT-RTX compute capability to build for, e.g. sm86, sm89, sm120 (sm89)")
    p.add_argument("--selection", choices=["auto", "plugin", "body"], default="auto",
                   help="what runs the destination selection: the toma::ToMASelect plugin (TensorRT 10.9+ and a "
                        "CUDA GPU), the inlined ONNX body, or auto: the plugin where it can run, else the body (auto)")
    p.add_argument("--ptx-version", type=int, metavar="N",
                   help="PTX ISA of the plugin's kernel, e.g. 84 for 8.4 (default: what the installed driver loads; "
                        "8.4 where none can be read)")
    p.add_argument("--no-toma", action="store_true", help="build the baseline engine without ToMA")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: the recipe's (FLUX bf16, SDXL fp16)")
    for which in ("min", "opt", "max"):
        p.add_argument(f"--{which}-size", type=size, help=f"{which} HEIGHTxWIDTH of the profile (recipe)")
    p.add_argument("--static", action="store_true", help="one shape (the opt size, batch 1) instead of a profile")
    p.add_argument("--text-len", type=int, metavar="N",
                   help="text tokens: a static engine's length, a profile's opt (default: the model's; FLUX.1-dev 512, "
                        "schnell 256)")
    p.add_argument("--weightless", nargs="?", const="refit", choices=["refit", "identical"],
                   help="a weight-stripped, refittable plan that every runner refits from the export's weights at "
                        "load. refit (the default; REFIT + STRIP_PLAN): keyed by the graph alone, so every weight "
                        "set of it (a LoRA, a fine-tune) reuses the plan and builds nothing; identical "
                        "(REFIT_IDENTICAL + STRIP_PLAN): the export's own weights only, and free of REFIT's "
                        "dropped-GEMM-bias caveat (docs/build.md). Needs a machine with an NVIDIA driver")
    p.add_argument("--timing-cache", help="TensorRT timing cache file, read and updated")
    p.add_argument("--output-dir", help="artifacts go to keyed subfolders (default: $TOMA_EXPORT_OUTPUT, engines/out in a "
                   "checkout, else ~/.cache/toma-export/artifacts)")
    p.add_argument("--force", action="store_true", help="export and build again even if cached")
    add_lora(p)
    add_controlnet(p)
    add_cache(p)
    add_json(p)
    add_quantize(p)
    add_toma_options(p, defaults="recipe")
    return p


def run(args) -> int:
    from .. import models
    from ..errors import UsageError
    from ..cache import check_family
    from ..lora import as_options
    from ..trt import BuildOptions, build, build_split, recipe
    from ..trt.build import check_quant, describe_selection

    check_family(args.cache, models.get(args.model))
    check_quant(args.quantize, args.backend, args.target)      # before calibrating
    defaults = recipe(args.model)
    config = None if args.no_toma else toma_config(args, defaults["toma"])
    options = BuildOptions(backend=args.backend, target=args.target, dtype=args.dtype, min_size=args.min_size,
                           opt_size=args.opt_size, max_size=args.max_size, static=args.static,
                           timing_cache=args.timing_cache, verbose=args.verbose, selection=args.selection,
                           ptx_version=args.ptx_version, text_len=args.text_len, weightless=args.weightless,
                           loras=as_options(args.lora), quant=quantization(args, args.model, config))
    controlnets = []
    with stdout_on_stderr():
        if args.controlnet:
            from ..trt.build import build_controlled

            if args.cache is not None:
                raise UsageError("ControlNet engines take no --cache yet; pass --cache none with --controlnet")
            both = build_controlled(args.model, [name for name, _ in args.controlnet], config, args.output_dir,
                                    options, controlnet_toma=not args.controlnet_unmerged, force=args.force)
            meta, controlnets = both["network"], both["controlnets"]
        else:
            meta = (build if args.cache is None else build_split)(args.model, config, args.output_dir, options,
                                                                  force=args.force)
    peak = peak_memory()                # children: the export, when it was not cached
    if args.json:
        print(json.dumps({**meta, **peak, **({"controlnets": controlnets} if controlnets else {})}))
        return 0
    for cn in controlnets:
        print(f"{cn['engine']}\n  ControlNet {cn['model']}, {cn['engine_bytes'] / 2**20:.1f} MiB, built in "
              f"{cn['build_seconds']:.0f} s; selection: {describe_selection(cn['selection'], cn.get('selection_reason'))}")
    print(f"{meta['engine']}\n  {meta['model']} {meta['dtype']}, {meta['backend']} {meta['backend_version']}"
          f"{' for ' + meta['target'] if meta['target'] else ''}, {'dynamic profile' if meta['dynamic'] else 'static'}, "
          f"{meta['engine_bytes'] / 2**20:.1f} MiB, built in {meta['build_seconds']:.0f} s")
    print(f"  selection: {describe_selection(meta['selection'], meta.get('selection_reason'))}")
    print(f"  onnx: {meta['onnx']}")
    if meta.get("quantize"):
        q = meta["quantize"]
        print(f"  {q['mode']} level {q['level']}: {q['quantized_layers']} quantized layers (strongly typed Q/DQ)")
    if meta.get("head"):
        print(f"  First-Block Cache tail; its head engine: {Path(meta['engine']).parent.parent / meta['head']} (the "
              "threshold is chosen where the pair runs)")
    if meta.get("weightless"):
        reused = ", reused: nothing built" if meta.get("plan_reused") else ""
        print(f"  plan: {meta['plan']} (weightless: {' + '.join(meta['builder_flags'])}{reused})")
        print(f"  weights: {meta['weights']} (refitted into the plan at every load)")
    else:
        print(f"  plan: {meta['plan']} (holds the weights of {meta['weights']})")
    for name, shapes in (meta["profiles"] or {}).items():
        print(f"    {name:<44} min {shapes['min']}  opt {shapes['opt']}  max {shapes['max']}")
    print(f"  {peak_memory_line(peak)}")
    return 0
