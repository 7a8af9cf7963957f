"""`toma-export generate`: one image from a diffusers pipeline running the exported ToMA graph or engine,
with a latency table per stage."""
from __future__ import annotations

import json

from .common import (MODEL_HELP, SCHEDULE, add_cache, add_controlnet, add_json, add_lora, add_quantize,
                     add_toma_options, peak_memory, peak_memory_line, progress, quantization, size, stdout_on_stderr,
                     toma_config, toma_options)


def add_parser(sub):
    p = sub.add_parser("generate", help="generate an image with a pipeline running the exported ToMA graph or engine")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--onnx", help="an exported model.onnx to run in ONNX Runtime (default: export or reuse one; "
                                     "with --cache, the tail of the split)")
    src.add_argument("--engine", help="a built engine's engine.json to run in TensorRT (default: build or reuse one)")
    p.add_argument("--baseline", help="the same model exported/built without ToMA, for steps the schedule leaves "
                                      "unmerged (default with --onnx/--engine: none)")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"],
                   help="default: tensorrt with CUDA and TensorRT, else onnxruntime (or what --onnx/--engine imply)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=int, default=28, help="denoising steps (28)")
    p.add_argument("--size", type=size, help="HEIGHTxWIDTH in pixels (the model's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, help="guidance scale (FLUX 3.5, SDXL 5.0; SDXL above 1 runs CFG at batch 2)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--no-toma", action="store_true", help="serve the baseline export without ToMA")
    p.add_argument("--no-share-weights", action="store_true",
                   help="onnxruntime: give the baseline session its own weights (faster kernels, twice the memory)")
    p.add_argument("--output-dir", help="export / engine cache (default: $TOMA_EXPORT_OUTPUT, engines/out in a "
                   "checkout, else ~/.cache/toma-export/artifacts)")
    p.add_argument("--force", action="store_true", help="export or build again even if cached")
    add_lora(p)
    add_controlnet(p, images=True)
    add_cache(p)
    add_json(p, "the table")
    add_quantize(p)
    add_toma_options(p)
    return p


def run(args) -> int:
    from ..errors import UsageError
    from ..lora import as_options
    from ..serve.generate import GenerateRequest, generate

    given = toma_options(args)
    if (args.onnx or args.engine) and set(given) - set(SCHEDULE):
        raise UsageError(f"--onnx/--engine files carry their own ToMA settings; only "
                         f"{', '.join('--' + n.replace('_', '-') for n in SCHEDULE)} can change (drop "
                         f"{', '.join('--' + n.replace('_', '-') for n in sorted(set(given) - set(SCHEDULE)))})")
    if (args.onnx or args.engine) and args.quantize != "none":
        raise UsageError("--onnx/--engine files carry their own quantization; drop --quantize")
    if args.controlnet:
        from ..onnx.export import refuse_with_controlnets

        refuse_with_controlnets(quant=args.quantize != "none")     # before calibrating
    config = None if args.no_toma else toma_config(args)
    request = GenerateRequest(
        model=args.model, prompt=args.prompt, out=args.out, steps=args.steps, size=args.size, seed=args.seed,
        guidance=args.guidance, config=config,
        schedule={k: v for k, v in given.items() if k in SCHEDULE} or None, onnx=args.onnx, engine=args.engine,
        baseline=args.baseline, backend=args.backend, share_weights=not args.no_share_weights,
        output_dir=args.output_dir, force=args.force, loras=as_options(args.lora), cache=args.cache,
        quant=quantization(args, args.model, config), controlnets=tuple(args.controlnet),
        control_images=tuple(args.control_image), control_modes=tuple(args.control_mode),
        controlnet_toma=not args.controlnet_unmerged)
    with stdout_on_stderr():            # TensorRT logs to stdout, which carries the --json object alone
        result = generate(request, progress)
    result = {**result, **peak_memory()}
    print(json.dumps(result) if args.json else _table(result))
    return 0


def _table(r: dict) -> str:
    lat = r["latency_ms"]
    toma = r["toma"]
    lines = [f"{r['image']}  ({r['model']}, {r['height']}x{r['width']} px, {r['steps']} steps, seed {r['seed']}, "
             f"guidance {r['guidance']})",
             f"  {r['backend']} on {r['provider']}: {r['onnx_or_engine'] or r['baseline']}"]
    if toma:
        lines.append(f"  ToMA ratio {toma['ratio']}, tile {toma['tile'][0]}x{toma['tile'][1]}, merge_steps "
                     f"{toma['merge_steps'] or 'all'}, dst_every {toma['dst_every']}: {r['calls']['toma']} merged "
                     f"call(s) ({r['calls']['recompute']} selecting), {r['calls']['baseline']} unmerged")
    for c in r.get("controlnets") or ():
        lines.append(f"  ControlNet {c['model']} at scale {c['scale']:g}: {c['onnx_or_engine'] or c['baseline']}")
    if r["cache"] != "none":
        lines.append(f"  {r['cache']}: {r['computed_steps']} step(s) computed, {r['cached_steps']} from the cache")
    if r.get("quantize"):
        q = r["quantize"]
        lines.append(f"  {q['mode']} level {q['level']}: {q['quantized_layers']} layers through Q/DQ")
    if r["weights_shared"]:
        lines.append(f"  weights: {r['weights_shared']}")
    lines.append(f"  {'stage':<26}{'ms':>10}")
    for key, label in (("text_encode", "text encode"), ("denoise_total", "denoise total"),
                       ("denoise_per_step", "  per step"), ("network_per_call_median", "  network call (median)"),
                       ("vae_decode", "VAE decode"), ("total", "total (pipeline call)"), ("setup", "setup (not in total)")):
        if lat[key] is not None:
            lines.append(f"  {label:<26}{lat[key]:>10.1f}")
    lines.append(f"  {peak_memory_line(r)}")
    return "\n".join(lines)
