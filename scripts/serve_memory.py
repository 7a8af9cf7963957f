"""What a merge-step schedule costs in memory on ONNX Runtime (toma_export.serve.memory): RSS growth of
the ToMA session alone, with a baseline session holding its own weights, and with both sharing one copy."""
import argparse
import json
import sys

from toma_export import models
from toma_export.errors import ToMAExportError
from toma_export.serve.memory import MODES, measure, weight_bytes
from toma_export.serve.pipeline import serving_artifacts
from toma_export.toma import ToMAConfig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/serve_memory.py", description=__doc__)
    parser.add_argument("--model", default="flux-tiny")
    parser.add_argument("--size", default=None, help="HEIGHTxWIDTH of the static exports (the model's default)")
    parser.add_argument("--output-dir", default=None, help="export cache (default: $TOMA_EXPORT_OUTPUT, engines/out in a "
                   "checkout, else ~/.cache/toma-export/artifacts)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else (None, None)
    size = models.get(args.model).size(*size)
    toma, base = serving_artifacts(args.model, ToMAConfig(merge_steps=2), size, 1, "onnxruntime", args.output_dir)
    rows = measure(toma, base)
    weights = dict(toma=weight_bytes(toma) / 2**20, baseline=weight_bytes(base) / 2**20)
    if args.json:
        print(json.dumps(dict(model=args.model, size=list(size), weights_mib=weights, rows=rows)))
        return 0
    print(f"{args.model} at {size[0]}x{size[1]} px: initializers {weights['toma']:.1f} MiB (ToMA file), "
          f"{weights['baseline']:.1f} MiB (baseline file); RSS growth in MiB")
    print(f"  {'configuration':<60} {'sessions':>9} {'+1 run':>8}")
    for r in rows:
        print(f"  {MODES[r['mode']]:<60} {r['sessions_mib']:>9.1f} {r['after_run_mib']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ToMAExportError as err:
        sys.exit(f"serve_memory: error: {err}")
