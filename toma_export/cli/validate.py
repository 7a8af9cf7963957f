"""`toma-export validate`: parity of ONNX Runtime / TensorRT against the fp32 PyTorch reference; exit 0 only
when something was compared and everything passed."""
from __future__ import annotations

import json
import sys

from .common import (MODEL_HELP, add_cache, add_controlnet, add_json, add_lora, add_quantize, add_toma_options, check_file_quantize,
                     names, peak_memory, peak_memory_line, quantization, sizes, stdout_on_stderr, toma_config)


def add_parser(sub):
    p = sub.add_parser("validate", help="accuracy parity of ONNX Runtime / TensorRT against the PyTorch reference")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--onnx", help="an exported model.onnx (default: export one, or reuse the cached export); its "
                                  "ToMA settings, dtype and, when static, size and batch are used")
    p.add_argument("--engine", help="a built engine's engine.json (default: build one when tensorrt is asked for)")
    p.add_argument("--backends", type=names, default=("torch", "onnxruntime"),
                   help="the candidates, a comma list from torch (PyTorch in --dtype, when that is not fp32), "
                        "onnxruntime, tensorrt; the fp32 PyTorch reference always runs (torch,onnxruntime)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="candidates' dtype (--onnx: the file's; fp32)")
    p.add_argument("--sizes", type=sizes, help="comma list of HEIGHTxWIDTH (the model's default size)")
    p.add_argument("--steps", type=int, default=0, help="also run a whole denoising loop of N steps (0: one step)")
    p.add_argument("--batch", type=int, help="batch of the sample inputs (a static --onnx file's, else 2)")
    p.add_argument("--atol", type=float, help="absolute tolerance (default 0)")
    p.add_argument("--rtol", type=float, help="tolerance relative to the output scale (default by dtype: fp32 "
                                              "1e-4 per step / 1e-3 over a loop, fp16 2e-2 / 5e-2, bf16 5e-2 / 1e-1)")
    p.add_argument("--no-toma", action="store_true", help="validate the network without ToMA")
    p.add_argument("--output-dir", help="where exports and engines are cached (default: $TOMA_EXPORT_OUTPUT, engines/out in a "
                   "checkout, else ~/.cache/toma-export/artifacts)")
    p.add_argument("--save-reference", metavar="F", help="store inputs and fp32 reference outputs in F (.npz)")
    p.add_argument("--load-reference", metavar="F", help="compare candidates against a stored reference "
                                                        "(e.g. made on another machine) instead of running PyTorch")
    p.add_argument("--report", metavar="DIR", help="write report.json, report.txt and errors.png there")
    p.add_argument("--bisect", action="store_true",
                   help="when ONNX Runtime fails a step, name the first transformer block out of tolerance (with "
                        "--controlnet: the first graph, then the block within it)")
    add_lora(p)
    add_cache(p)
    add_controlnet(p)
    add_json(p, "the table")
    add_quantize(p)
    add_toma_options(p)
    return p


def run(args) -> int:
    if args.controlnet:
        from ..onnx.export import refuse_with_controlnets

        refuse_with_controlnets(cache=args.cache is not None, quant=args.quantize != "none")
    if args.cache is not None:
        return _run_cache(args)
    from ..lora import as_options
    from ..parity import ValidateOptions, table, validate, write_report

    config = None if args.no_toma else toma_config(args)
    if args.onnx:                      # the file's own quantization, if any (parity.validate reads it)
        from ..artifacts import Artifact

        check_file_quantize(Artifact.load(args.onnx, "onnx"), None if args.quantize == "none" else args.quantize,
                            "drop --quantize (the file's own is used) or pass another file")
    quant = None if args.onnx else quantization(args, args.model, config)
    options = ValidateOptions(backends=args.backends, dtype=args.dtype, sizes=args.sizes, steps=args.steps,
                              batch=args.batch, atol=args.atol, rtol=args.rtol, onnx=args.onnx, engine=args.engine,
                              output_dir=args.output_dir, save_reference=args.save_reference,
                              load_reference=args.load_reference, bisect=args.bisect, loras=as_options(args.lora),
                              quant=quant, controlnets=tuple(args.controlnet),
                              controlnet_toma=not args.controlnet_unmerged)
    with stdout_on_stderr():
        report = validate(args.model, config, options)
    if args.report:
        files = write_report(report, args.report)
        print(f"[validate] report written: {', '.join(files)}", file=sys.stderr)
    peak = peak_memory()
    print(f"[validate] {peak_memory_line(peak)}", file=sys.stderr)
    print(json.dumps({**report, **peak}) if args.json else table(report))
    return 0 if report["passed"] else 1


def _run_cache(args) -> int:
    """--cache: the served First-Block Cache loop (ONNX Runtime head and tail) step by step against the PyTorch
    network with diffusers' hook."""
    from ..errors import UsageError
    from ..parity.cache import table, validate_cache

    given = [flag for flag, value in (("--onnx", args.onnx), ("--engine", args.engine), ("--dtype", args.dtype),
                                      ("--batch", args.batch), ("--save-reference", args.save_reference),
                                      ("--load-reference", args.load_reference), ("--report", args.report),
                                      ("--bisect", args.bisect), ("--lora", args.lora)) if value]
    if args.backends != ("torch", "onnxruntime"):
        given.append("--backends")
    if given or (args.sizes and len(args.sizes) > 1):
        raise UsageError(f"validate --cache runs the fp32 head/tail split it exports on ONNX Runtime at one size; drop "
                         f"{', '.join(given) or 'all but one of --sizes'}")
    with stdout_on_stderr():
        report = validate_cache(args.model, None if args.no_toma else toma_config(args), args.cache,
                                steps=args.steps or 28, size=args.sizes[0] if args.sizes else None,
                                output_dir=args.output_dir, rtol=args.rtol, atol=args.atol)
    peak = peak_memory()
    print(f"[validate] {peak_memory_line(peak)}", file=sys.stderr)
    print(json.dumps({**report, **peak}) if args.json else table(report))
    return 0 if report["passed"] else 1
