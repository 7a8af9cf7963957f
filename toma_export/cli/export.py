"""`toma-export export`: the ToMA-patched network as ONNX, the selection as toma::ToMASelect."""
from __future__ import annotations

import json
from pathlib import Path

from .common import (MODEL_HELP, add_cache, add_controlnet, add_json, add_lora, add_quantize, add_toma_options,
                     peak_memory, peak_memory_line, quantization, size, toma_config)


def add_parser(sub):
    p = sub.add_parser("export", help="export the ToMA-patched network to ONNX (selection as toma::ToMASelect)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's default size)")
    p.add_argument("--width", type=int, help="image width in pixels")
    p.add_argument("--batch", type=int, default=1, help="static batch (CFG counts twice) (1)")
    p.add_argument("--dynamic", action="store_true",
                   help="one file valid across the model's batch, size and text-length ranges")
    p.add_argument("--min-size", type=size, help="dynamic: smallest HEIGHTxWIDTH (default: the model's range)")
    p.add_argument("--max-size", type=size, help="dynamic: largest HEIGHTxWIDTH")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"],
                   help="weights and activations (default: the dtype the model's weights are stored in; fp32 for "
                        "the tiny models)")
    p.add_argument("--text-len", type=int, metavar="N",
                   help="text tokens: a static export's length, a dynamic one's opt (default: the model's; FLUX.1-dev "
                        "512, schnell 256)")
    p.add_argument("--opset", type=int, default=20, help="ONNX opset, 17-22 (20; a quantized export 19 or later)")
    p.add_argument("--no-toma", action="store_true", help="export the network without ToMA (the baseline)")
    p.add_argument("--output-dir", help="exports go to keyed subfolders of its onnx/, where build, validate and "
                   "generate look (default: $TOMA_EXPORT_OUTPUT, engines/out in a checkout, else "
                   "~/.cache/toma-export/artifacts)")
    p.add_argument("--force", action="store_true", help="export again even if an identical export exists")
    p.add_argument("--link-weights", action="store_true",
                   help="point the graph into the folder's own safetensors files (hard-linked into the export) where "
                        "the weights need no conversion, instead of copying them: no extra disk, and a fine-tune or "
                        "LoRA export in seconds. Same filesystem only (else copied); onnx.load refuses hard links "
                        "(ONNX Runtime and TensorRT-RTX's parser read them)")
    add_lora(p)
    add_controlnet(p)
    add_cache(p)
    add_json(p)
    add_quantize(p)
    add_toma_options(p)
    return p


def run(args) -> int:
    from .. import models
    from ..cache import check_family
    from ..onnx import ExportOptions, export
    from ..onnx.export import export_controlled, export_split, refuse_with_controlnets
    from ..lora import as_options
    from ..resources import default_output
    from ..toma.tiles import check_tiling

    config = None if args.no_toma else toma_config(args)
    spec = models.get(args.model)
    check_family(args.cache, spec)
    if config is not None:
        check_tiling(spec.token_grid(args.height, args.width), config.tile)     # before any heavy loading
    if args.controlnet:
        refuse_with_controlnets(quant=args.quantize != "none")     # before calibrating
    quant = quantization(args, args.model, config)
    options = ExportOptions(height=args.height, width=args.width, batch=args.batch, dynamic=args.dynamic,
                            dtype=args.dtype, opset=args.opset, min_size=args.min_size, max_size=args.max_size,
                            text_len=args.text_len, loras=as_options(args.lora), link_weights=args.link_weights,
                            quant=quant)
    out = Path(args.output_dir or default_output()) / "onnx"
    controlnets = []
    if args.controlnet:
        refuse_with_controlnets(cache=args.cache is not None)
        both = export_controlled(args.model, [name for name, _ in args.controlnet], config, out, options,
                                 controlnet_toma=not args.controlnet_unmerged, force=args.force)
        meta, controlnets = both["network"], both["controlnets"]
    else:
        make = export if args.cache is None else export_split
        meta = make(args.model, config, out, options, force=args.force)
    peak = peak_memory()
    if args.json:
        print(json.dumps({**meta, **peak, **({"controlnets": controlnets} if controlnets else {})}))
        return 0
    for cn in controlnets:
        print(f"{cn['onnx']}\n  ControlNet {cn['model']}: {len(cn['outputs'])} outputs, "
              f"{'ToMA ratio ' + str(cn['toma']['ratio']) if cn['toma'] else 'no ToMA'}"
              f"{' (graph of ' + cn['graph_from'] + ')' if cn.get('graph_from') else ''}")
    kind = (f"dynamic: batch {meta['ranges']['batch'][0]}-{meta['ranges']['batch'][2]}, sizes "
            f"{'x'.join(map(str, meta['ranges']['sizes'][0]))} to {'x'.join(map(str, meta['ranges']['sizes'][2]))} px"
            if meta["dynamic"] else
            f"static: batch {meta['batch']}, {meta['height']}x{meta['width']} px, {meta['text_len']} text tokens")
    print(f"{meta['onnx']}\n  {meta['model']} {meta['dtype']} opset {meta['opset']}, {kind}")
    if meta.get("head"):
        head = Path(meta["onnx"]).parent.parent / meta["head"]
        print(f"  First-Block Cache tail; its head: {head} (the threshold is chosen where the pair runs: "
              "generate/sweep --cache)")
    toma = meta["toma"]
    if toma:
        print(f"  ToMA ratio {toma['ratio']}, tile {toma['tile'][0]}x{toma['tile'][1]}, {toma['destinations_per_tile']} "
              f"destinations per tile, {toma['selection_nodes']} toma::ToMASelect node(s), sublayers "
              f"{','.join(toma['sublayers'])}")
    else:
        print("  no ToMA (baseline)")
    q = meta.get("quantize")
    if q:
        print(f"  {q['mode']} level {q['level']}: {q['quantized_layers']} layers through QuantizeLinear/DequantizeLinear, "
              f"scales from {q['scales']}")
    w = meta["weights"]
    print(f"  weights: {w['tensors']} tensors, {w['bytes'] / 2**20:.1f} MiB in {w['file']}, from {w['source']}"
          f"{' (graph of ' + meta['graph_from'] + ')' if meta.get('graph_from') else ''}")
    for io in ("inputs", "outputs"):
        print(f"  {io}:")
        for v in meta[io]:
            print(f"    {v['name']:<44} {v['dtype']:<8} {v['shape']}")
    print(f"  {peak_memory_line(peak)}")
    return 0
