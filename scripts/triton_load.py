"""Load on a real Triton Inference Server: requests per second and p50 / p95 latency of the pipeline model at
1, 4 and 16 concurrent clients.

It exports (or reuses from the cache) the model's dynamic ONNX export, writes a repository with
`export-repo --onnx`, starts tritonserver (`toma-export serve --install` fetches it), warms every instance,
then for each concurrency level runs that many client threads (each with its own connection) sending
--requests requests in all (64), seeds distinct. Prints one JSON object (also written to --out) and a markdown
table for the README, with the CPU model from /proc/cpuinfo.

    python scripts/triton_load.py --model flux-tiny --instances 2 --out docs/triton_load.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import toma_export as te
from toma_export.onnx import ExportOptions, export
from toma_export.resources import default_output
from toma_export.serve import triton_server
from toma_export.serve.repository import export_pipeline
from toma_export.serve.triton_client import Client


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def level(url: str, protocol: str, model: str, clients: int, requests: int, size, steps: int, first_seed: int):
    latencies, errors = [], []
    seeds = list(range(first_seed, first_seed + requests))

    def worker(k):
        client = Client(url, protocol, model)
        try:
            for seed in seeds[k::clients]:
                t0 = time.perf_counter()
                client.generate("a red fox in the snow", *size, steps, seed)
                latencies.append(time.perf_counter() - t0)
        except Exception as err:   # noqa: BLE001  (counted and reported)
            errors.append(f"{type(err).__name__}: {err}")
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return dict(clients=clients, requests=requests, completed=len(latencies), errors=errors[:3],
                seconds=round(wall, 3), requests_per_s=round(len(latencies) / wall, 2),
                p50_ms=round(statistics.median(latencies) * 1e3, 1), p95_ms=round(q[18] * 1e3, 1))


def table(result: dict) -> str:
    rows = ["| clients | requests/s | p50 ms | p95 ms | completed |", "|---|---|---|---|---|"]
    rows += [f"| {r['clients']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p95_ms']} | "
             f"{r['completed']}/{r['requests']} |" for r in result["levels"]]
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="flux-tiny")
    p.add_argument("--size", default="128x128", help="HEIGHTxWIDTH (128x128)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--instances", type=int, default=2, help="pipeline model instances (2)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level (64)")
    p.add_argument("--protocol", choices=["http", "grpc"], default="grpc")
    p.add_argument("--onnx", help="an existing dynamic export of --model (default: export or reuse one)")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    parts = triton_server.install()
    onnx = args.onnx or export(args.model, te.ToMAConfig(), Path(default_output()) / "onnx",
                               ExportOptions(dynamic=True))["onnx"]
    with tempfile.TemporaryDirectory(prefix="toma-triton-load-") as tmp:
        name = export_pipeline(onnx, Path(tmp) / "repo", args.model, args.instances).name
        ports = [triton_server.free_port() for _ in range(3)]
        with triton_server.Server(Path(tmp) / "repo", *ports, log=Path(tmp) / "server.log", parts=parts) as server:
            url = server.grpc_url if args.protocol == "grpc" else server.http_url
            level(url, args.protocol, name, args.instances, 2 * args.instances, size, args.steps, 0)   # warm-up
            levels = [level(url, args.protocol, name, int(c), args.requests, size, args.steps, 1000 * (i + 1))
                      for i, c in enumerate(args.concurrency.split(","))]
    result = dict(model=args.model, size=list(size), steps=args.steps, instances=args.instances,
                  protocol=args.protocol, network="onnxruntime (CPUExecutionProvider), OMP_NUM_THREADS="
                  f"{os.environ.get('OMP_NUM_THREADS', '1')} per instance", cpu=cpu_model(),
                  cores=os.cpu_count(), levels=levels)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    print(table(result), file=sys.stderr)
    return 0 if all(r["completed"] == r["requests"] for r in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
