"""Load on a real Triton Inference Server: requests per second and p50 / p95 latency of the pipeline model at
1, 4 and 16 concurrent clients.

It exports (or reuses from the cache) the model's dynamic ONNX export, writes a repository with
`export-repo --onnx`, starts tritonserver (`toma-export serve --install` fetches it), warms every instance,
then for each concurrency level runs that many client threads (each with its own connection) sending
--requests requests in all (64), seeds distinct. Then, for each --faults level (4 and 16 clients), it runs the
same load again and kills one model worker (SIGKILL, as the out-of-memory killer would) once a quarter of the
requests are done: it reports the requests that failed, the seconds from the kill until the model was ready
again, and checks every other image against the same pipeline run in this process. Prints one JSON object
(also written to --out) and markdown tables for docs/triton.md, with the CPU model from /proc/cpuinfo.

    python scripts/triton_load.py --model flux-tiny --instances 2 --out docs/triton_load.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import toma_export as te
from toma_export.onnx import ExportOptions, export
from toma_export.resources import default_output
from toma_export.serve import recovery, triton_server
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


PROMPT = "a red fox in the snow"
TOLERANCE = 2           # uint8 levels: a dynamically batched request may differ from a single one by rounding


def level(url: str, protocol: str, model: str, clients: int, requests: int, size, steps: int, first_seed: int,
          images: dict | None = None, on_done=None):
    """`clients` threads send `requests` requests; a failed request is counted and its client goes on."""
    latencies, errors, waited = [], [], []
    seeds = list(range(first_seed, first_seed + requests))

    def worker(k):
        client = Client(url, protocol, model)
        try:
            for seed in seeds[k::clients]:
                t0 = time.perf_counter()
                try:
                    image = client.generate(PROMPT, *size, steps, seed)
                except Exception as err:   # noqa: BLE001  (counted and reported)
                    errors.append(f"{type(err).__name__}: {err}")
                    continue
                latencies.append(time.perf_counter() - t0)
                if images is not None:
                    images[seed] = image
                if on_done:
                    on_done(len(latencies))
        finally:
            waited.append(client.waited)
            client.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return dict(clients=clients, requests=requests, completed=len(latencies), failed=len(errors),
                errors=errors[:3], waited_for_reload=sum(waited), seconds=round(wall, 3),
                requests_per_s=round(len(latencies) / wall, 2),
                p50_ms=round(statistics.median(latencies) * 1e3, 1), p95_ms=round(q[18] * 1e3, 1))


def fault_level(server, url, protocol, model, clients, requests, size, steps, first_seed, reference):
    """A load level during which one worker of `model` is killed once a quarter of the requests are done."""
    images, killed = {}, {}

    def kill_once(done):
        if done >= requests // 4 and not killed:
            killed["pid"] = recovery.workers(server.process.pid)[model][0]
            killed["at"] = time.monotonic()
            os.kill(killed["pid"], signal.SIGKILL)
            threading.Thread(target=watch_readiness).start()

    def watch_readiness():
        while server.model_ready(model) and time.monotonic() - killed["at"] < 5:      # until the watchdog unloads it
            time.sleep(0.05)
        while not server.model_ready(model) and time.monotonic() - killed["at"] < 120:
            time.sleep(0.05)
        killed["ready_after_s"] = round(time.monotonic() - killed["at"], 2)

    lock = threading.Lock()

    def on_done(done):
        with lock:
            kill_once(done)

    result = level(url, protocol, model, clients, requests, size, steps, first_seed, images, on_done)
    deadline = time.monotonic() + 120
    while "ready_after_s" not in killed and time.monotonic() < deadline:
        time.sleep(0.1)
    wrong = [seed for seed, image in images.items()
             if np.abs(image.astype(int) - reference(seed).astype(int)).max() > TOLERANCE]
    result.update(killed_pid=killed.get("pid"), ready_again_after_s=killed.get("ready_after_s"),
                  reload_s=[r["seconds"] for r in server.recoveries][-1:], images_checked=len(images),
                  images_wrong=wrong)
    return result


def table(result: dict) -> str:
    rows = ["| clients | requests/s | p50 ms | p95 ms | completed |", "|---|---|---|---|---|"]
    rows += [f"| {r['clients']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p95_ms']} | "
             f"{r['completed']}/{r['requests']} |" for r in result["levels"]]
    if result["faults"]:
        rows += ["", "| clients | failed | ready again after the kill | waited for the reload, then answered | "
                 "other images correct |", "|---|---|---|---|---|"]
        rows += [f"| {r['clients']} | {r['failed']}/{r['requests']} | {r['ready_again_after_s']} s | "
                 f"{r['waited_for_reload']} | {r['images_checked'] - len(r['images_wrong'])}/{r['images_checked']} |"
                 for r in result["faults"]]
    return "\n".join(rows)


def reference_images(network: Path, size, steps: int):
    """Seed -> the image the same pipeline draws in this process (one thread, as each served instance)."""
    import torch

    from toma_export.serve.generate import Session

    session = Session(network)
    torch.set_num_threads(1)

    def image(seed):
        out = session.run([PROMPT], [seed], *size, steps, session.spec.default_guidance)[0]
        return np.asarray(out.convert("RGB"))

    return image


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
    p.add_argument("--faults", default="4,16", help="concurrency levels to run again with one worker killed "
                   "mid-run (4,16; empty: none)")
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
            reference = reference_images(Path(tmp) / "repo" / name / "1" / "network", size, args.steps)
            faults = [fault_level(server, url, args.protocol, name, int(c), args.requests, size, args.steps,
                                  100_000 * (i + 1), reference)
                      for i, c in enumerate(filter(None, args.faults.split(",")))]
    result = dict(model=args.model, size=list(size), steps=args.steps, instances=args.instances,
                  protocol=args.protocol, network="onnxruntime (CPUExecutionProvider), OMP_NUM_THREADS="
                  f"{os.environ.get('OMP_NUM_THREADS', '1')} per instance", cpu=cpu_model(),
                  cores=os.cpu_count(), levels=levels, faults=faults)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    print(table(result), file=sys.stderr)
    whole = all(r["completed"] == r["requests"] for r in levels)
    recovered = all(r["ready_again_after_s"] is not None and not r["images_wrong"] for r in faults)
    return 0 if whole and recovered else 1


if __name__ == "__main__":
    sys.exit(main())
