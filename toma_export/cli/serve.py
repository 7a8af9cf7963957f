"""`toma-export serve`: a real Triton Inference Server on a model repository, until SIGTERM or Ctrl-C."""
from __future__ import annotations

import signal


def add_parser(sub):
    p = sub.add_parser("serve", help="run tritonserver on a repository from export-repo (--install fetches it)")
    p.add_argument("--repo", help="the model repository (written by `toma-export export-repo`)")
    p.add_argument("--address", default="127.0.0.1",
                   help="the address HTTP, gRPC and metrics listen on (127.0.0.1: this machine only; 0.0.0.0: every "
                        "interface, e.g. in a container or behind an authenticating proxy)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--install", action="store_true",
                   help="download the server (the nvidia-pytriton wheel, unpacked, never pip-installed) and exit")
    p.add_argument("--wheel", action="append", help="with --install: a wheel already downloaded (nvidia-pytriton "
                   "or numpy 1.x; repeat for both)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for every model to load (600)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="passed to tritonserver as it is; repeatable (e.g. --server-arg=--http-restricted-api="
                        "inference,model-repository:x-api-key=SECRET)")
    p.add_argument("--model", action="append", metavar="NAME",
                   help="serve only this model of the repository; repeatable (default: every model in it)")
    p.add_argument("--no-recover", dest="recover", action="store_false",
                   help="do not watch the model workers: a model whose worker died stays broken until restarted "
                        "(by default serve reloads it, with explicit model control)")
    return p


def run(args) -> int:
    from ..errors import UsageError
    from ..serve import triton_server
    from .common import progress

    if args.install:
        parts = triton_server.install(progress, args.wheel)
        print(parts.binary)
        return 0
    if not args.repo:
        raise UsageError("serve needs --repo REPO (or --install)")
    server = triton_server.Server(args.repo, args.http_port, args.grpc_port, args.metrics_port,
                                  extra_args=args.server_arg, address=args.address,
                                  recover=args.recover, progress=progress, models=args.model)
    stop = []

    def on_signal(signum, frame):
        stop.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start(args.timeout)
        where = ("every interface: anyone who reaches this machine can use it" if server.exposed
                 else f"{server.address} only")
        watch = "; a model whose worker dies is reloaded" if args.recover else ""
        progress(f"[serve] ready on {where}: http {server.http_url}, grpc {server.grpc_url}, metrics port "
                 f"{args.metrics_port}{watch}; Ctrl-C or SIGTERM stops it")
        server.process.wait()
        progress(f"[serve] tritonserver exited with status {server.process.returncode}")
        return 1
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)       # a second signal must not cut the shutdown short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        progress("[serve] stopping tritonserver")
        code = server.stop()
        progress(f"[serve] stopped (status {code})")
        return 0
    finally:
        server.stop()
