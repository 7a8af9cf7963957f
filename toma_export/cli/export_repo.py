"""`toma-export export-repo`: a Triton Inference Server model repository for a built engine."""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("export-repo", help="write a Triton Inference Server model repository for a built engine")
    p.add_argument("--engine", required=True, help="engine.json written by `toma-export build`, or its folder")
    p.add_argument("--out", required=True, help="the model repository folder (created if needed)")
    p.add_argument("--name", help="model name, the folder under REPO (default: the model's name)")
    p.add_argument("--max-batch-size", type=int, default=0,
                   help="Triton's max_batch_size (0: requests carry the batch; ToMA engines need 0)")
    p.add_argument("--instances", type=int, default=1, help="model instances per GPU (1)")
    p.add_argument("--force", action="store_true", help="replace an existing model folder")
    p.add_argument("--allow-tensorrt-rtx", action="store_true",
                   help="write a TensorRT-RTX engine anyway (Triton's TensorRT backend cannot load it)")
    return p


def run(args) -> int:
    from ..serve.repository import export_repo

    final = export_repo(args.engine, args.out, args.name, args.max_batch_size, args.instances, args.force,
                        args.allow_tensorrt_rtx)
    print(f"{final}\n  config.pbtxt, 1/model.plan\n  serve: tritonserver --model-repository={final.parent}")
    return 0
