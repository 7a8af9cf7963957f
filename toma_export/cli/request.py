"""`toma-export request`: send one prompt to a served pipeline model and save the image."""
from __future__ import annotations

import json

from .common import add_json, size


def add_parser(sub):
    p = sub.add_parser("request", help="ask a running `toma-export serve` for one image (HTTP or gRPC)")
    p.add_argument("--url", default="127.0.0.1:8000", help="HOST:PORT of the server's HTTP (or, with --grpc, gRPC) "
                                                          "endpoint (127.0.0.1:8000)")
    p.add_argument("--grpc", action="store_true", help="talk gRPC instead of HTTP")
    p.add_argument("--model", help="the pipeline model's name (default: the repository's only pipeline model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--size", type=size, default=(256, 256), help="HEIGHTxWIDTH in pixels (256x256)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, help="guidance scale (the model's default)")
    p.add_argument("--max-seconds", type=float, help="time budget of this request (at most the model's)")
    p.add_argument("--header", action="append", default=[], metavar="KEY=VALUE",
                   help="an HTTP header or gRPC metadata entry to send, e.g. x-api-key=SECRET for a server "
                        "started with Triton's restricted APIs; repeatable")
    p.add_argument("--control-image", action="append", default=[], metavar="FILE",
                   help="a PNG or JPEG sent as it is, one per ControlNet of the model (export-repo --controlnet), in "
                        "their order; repeatable")
    p.add_argument("--control-scale", action="append", type=float, metavar="S",
                   help="the conditioning scale of each --control-image, in order (default: the model's, set by "
                        "export-repo --controlnet NAME:SCALE); repeatable")
    p.add_argument("--out", required=True, help="PNG file to write")
    add_json(p)
    return p


def run(args) -> int:
    import time
    from pathlib import Path

    from PIL import Image

    from ..serve.triton_client import Client

    from ..errors import UsageError

    headers = dict(h.split("=", 1) for h in args.header if "=" in h)
    if len(headers) != len(args.header):
        raise UsageError(f"--header takes KEY=VALUE, got {[h for h in args.header if '=' not in h][0]!r}")
    if args.control_scale is not None and len(args.control_scale) != len(args.control_image):
        raise UsageError(f"{len(args.control_image)} --control-image and {len(args.control_scale)} --control-scale: "
                         "give one scale per control image, or none for the model's")
    controls = []
    for path in args.control_image:         # sent as they are: the model checks and decodes them
        try:
            controls.append(Path(path).expanduser().read_bytes())
        except OSError as err:
            raise UsageError(f"--control-image {path}: {err.strerror or err}") from None
    client = Client(args.url, "grpc" if args.grpc else "http", args.model, headers=headers)
    t0 = time.perf_counter()
    image = client.generate(args.prompt, *args.size, args.steps, args.seed, args.guidance, args.max_seconds,
                            control_images=controls, control_scales=args.control_scale)
    seconds = time.perf_counter() - t0
    client.close()
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    tmp.replace(out)
    result = dict(image=str(out), model=client.model, height=image.shape[0], width=image.shape[1],
                  seconds=round(seconds, 3))
    print(json.dumps(result) if args.json else f"{out}  ({client.model}, {image.shape[0]}x{image.shape[1]} px, "
          f"{seconds:.2f} s)")
    return 0
