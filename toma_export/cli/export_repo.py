"""`toma-export export-repo`: a Triton Inference Server model repository whose pipeline model answers
prompt -> image, from an ONNX export (ONNX Runtime, CPU) or a built engine (TensorRT, GPU; the engine is also
written as a `tensorrt_plan` model for clients that run the denoising loop themselves). With --controlnet the
pipeline model also loads the ControlNets' exports and takes one control image per ControlNet per request."""
from __future__ import annotations

import json

from .common import add_cache, add_control_mode, add_json, check_file_quantize, controlnet


def add_parser(sub):
    p = sub.add_parser("export-repo", help="write a Triton Inference Server model repository (pipeline model: "
                                           "prompt -> image)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", help="an exported model.onnx (or its folder): the pipeline runs it in ONNX Runtime")
    src.add_argument("--engine", help="engine.json written by `toma-export build`, or its folder: a tensorrt_plan "
                                      "model plus a pipeline running the engine in TensorRT")
    p.add_argument("--baseline", help="the same model exported without ToMA, for schedules that leave steps unmerged")
    p.add_argument("--out", required=True, help="the model repository folder (created if needed)")
    p.add_argument("--name", help="model name, the folder under REPO (default: the model's name; with --engine the "
                                  "pipeline is NAME-pipeline)")
    p.add_argument("--max-batch-size", type=int, default=0,
                   help="--engine: the plan model's max_batch_size (0: requests carry the batch; ToMA engines need 0)")
    p.add_argument("--instances", type=int, default=1, help="model instances (instance_group count, 1)")
    p.add_argument("--kind", choices=["cpu", "gpu"], help="pipeline instances on CPU or GPU (default: cpu with "
                                                          "--onnx, gpu with --engine)")
    p.add_argument("--max-steps", type=int, default=100, help="the most denoising steps a request may ask for "
                   "(100); more is refused before any work")
    p.add_argument("--max-seconds", type=float, default=300.0, help="time budget of one request's pipeline run in "
                   "seconds (300): the run stops after the step that passes it; a request may ask for less")
    p.add_argument("--force", action="store_true", help="replace existing model folders")
    p.add_argument("--allow-tensorrt-rtx", action="store_true",
                   help="write a TensorRT-RTX engine anyway (Triton's TensorRT backend cannot load it)")
    add_cache(p)
    add_json(p)
    p.add_argument("--quantize", choices=["none", "int8", "fp8"],
                   help="the 8-bit mode the file must have been exported or built with (a deployment check; the "
                        "file carries its own: `export/build --quantize`)")
    group = p.add_argument_group("ControlNet (docs/controlnet.md)")
    group.add_argument("--controlnet", action="append", type=controlnet, default=[], metavar="NAME|EXPORT[:SCALE]",
                       help="a ControlNet the --onnx network takes residuals from, at conditioning SCALE (1) unless a "
                            "request sends control_scale: its export (model.onnx, toma.json or folder), or its name "
                            "or diffusers folder, whose export is found beside the network's (where `export "
                            "--controlnet` writes it); repeatable, in the order of a request's control images")
    group.add_argument("--controlnet-unmerged", action="store_true",
                       help="by name: take the ControlNets' exports without ToMA (export --controlnet-unmerged)")
    add_control_mode(group)
    return p


def run(args) -> int:
    from pathlib import Path

    from ..artifacts import Artifact
    from ..serve.network import head_of
    from ..serve.repository import (RepositoryError, check_control, controlnet_exports, export_pipeline,
                                    export_repo)
    from ..serve.triton_model import Limits

    try:
        limits = Limits(max_steps=args.max_steps, max_seconds=args.max_seconds)
    except ValueError as err:
        raise RepositoryError(f"{err}; pass --max-steps N >= 1 and --max-seconds S > 0") from None
    if args.controlnet:                 # what ControlNets do not combine with, before any file is read
        from ..onnx.export import refuse_with_controlnets

        if args.engine:
            raise RepositoryError("ControlNets are served through ONNX Runtime so far: pass the network's export that "
                                  "takes their residuals with --onnx, not --engine (docs/controlnet.md)")
        refuse_with_controlnets(cache=args.cache is not None, quant=args.quantize not in (None, "none"))

    result = {"repository": str(Path(args.out).expanduser().resolve())}
    artifact = Artifact.load(args.engine, "engine") if args.engine else Artifact.load(args.onnx, "onnx")
    check_file_quantize(artifact, args.quantize, f"{'build' if args.engine else 'export'} it with --quantize "
                        f"{args.quantize}, or drop --quantize")
    check_control(artifact, bool(args.controlnet))
    controlnets = []
    if args.controlnet:
        found = controlnet_exports(artifact, [name for name, _ in args.controlnet], args.controlnet_unmerged)
        controlnets = [(cn, base, scale) for (cn, base), (_, scale) in zip(found, args.controlnet)]
    from .. import models
    from ..families.controlnet import control_modes

    modes = control_modes([models.get(cn.model) for cn, _, _ in controlnets], args.control_mode)
    if args.engine:
        head = head_of(artifact, args.cache)           # a First-Block Cache tail: its head gets a plan model too
        name = args.name or Path(artifact.model).name
        pipeline = f"{name}-pipeline"
        if args.kind == "cpu":
            raise RepositoryError("a TensorRT engine runs on a GPU: drop --kind cpu, or export the repository from "
                                  "an ONNX export with --onnx to serve on CPU")
        repo = Path(args.out).expanduser()
        for folder in (repo / name, repo / pipeline, *([repo / f"{name}-head"] if head else [])):   # before any
            if not args.force and folder.exists():
                raise RepositoryError(f"{folder} already exists; pass --force to replace it, or choose another "
                                      "--name")
        final = export_repo(args.engine, args.out, name, args.max_batch_size, args.instances, args.force,
                            args.allow_tensorrt_rtx)
        if head is not None:
            export_repo(head.path, args.out, f"{name}-head", args.max_batch_size, args.instances, args.force,
                        args.allow_tensorrt_rtx)
            result.update(head_plan_model=f"{name}-head")
        export_pipeline(artifact, args.out, pipeline, args.instances, args.kind or "gpu", force=True,
                        baseline=args.baseline, limits=limits, cache=args.cache)
        result.update(plan_model=final.name, pipeline_model=pipeline, network="tensorrt")
    else:
        name = args.name or Path(artifact.model).name
        final = export_pipeline(artifact, args.out, name, args.instances, args.kind or "cpu", args.force,
                                baseline=args.baseline, limits=limits, cache=args.cache, controlnets=controlnets,
                                control_modes=modes)
        result.update(pipeline_model=final.name, network="onnxruntime")
        if controlnets:
            result["controlnets"] = [dict(model=cn.model, scale=scale, mode=mode, onnx=str(cn.path),
                                          baseline=str(base.path) if base else None)
                                     for (cn, base, scale), mode in zip(controlnets, modes)]
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['repository']}\n  pipeline model: {result['pipeline_model']} (prompt -> image, "
              f"{result['network']})" + (f"\n  plan model: {result['plan_model']}" if "plan_model" in result else "")
              + (f"\n  head plan model: {result['head_plan_model']}" if "head_plan_model" in result else "")
              + "".join(f"\n  ControlNet {i}: {c['model']} at scale {c['scale']:g} ({c['onnx']})"
                        for i, c in enumerate(result.get("controlnets", ())))
              + f"\n  serve: toma-export serve --repo {result['repository']}")
    return 0

