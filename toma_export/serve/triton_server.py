"""A real Triton Inference Server on this machine: find or install its parts, start it on a repository, wait
until it is ready, stop it.

The parts come from the `nvidia-pytriton` wheel, which bundles the `tritonserver` binary, its shared
libraries, the Python backend and one backend stub per Python version. The wheel is never pip-installed (it
requires numpy<2, which would replace the project's numpy): `install()` downloads it with
`pip download --no-deps` and unpacks it into a cache folder, then lays out a backend folder holding the
Python backend plus the stub for the running Python. The server's Python models import this toolkit, torch
and ONNX Runtime from the running interpreter's import path (passed as $TOMA_EXPORT_PYTHONPATH, because the
stub's embedded interpreter ignores PYTHONPATH), so they see exactly this environment.

Cache folder: $TOMA_EXPORT_TRITON_HOME, else $XDG_CACHE_HOME/toma-export (~/.cache/toma-export) /
tritonserver-<wheel version>.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExecutionError, MissingComponent, UsageError
from . import recovery

PYTRITON_VERSION = "0.7.0"          # bundles tritonserver 2.51.0 and stubs for Python 3.8 to 3.13
# The stub's C++ side builds NumPy arrays through the NumPy 1.x C API: under NumPy 2 it reads the wrong dtype
# size, so `as_numpy()` returns corrupt data (a BYTES prompt "a fox" arrives as nine 0x05 bytes). The model
# processes therefore import this NumPy, unpacked beside the server; the project's environment keeps NumPy 2.
STUB_NUMPY = "1.26.4"
INSTALL_HINT = "run `toma-export serve --install` (downloads nvidia-pytriton and unpacks it, no pip install)"


def home() -> Path:
    """The folder holding the unpacked server parts."""
    if os.environ.get("TOMA_EXPORT_TRITON_HOME"):
        return Path(os.environ["TOMA_EXPORT_TRITON_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "")
    cache = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"
    return cache / "toma-export" / f"tritonserver-{PYTRITON_VERSION}"


@dataclass(frozen=True)
class ServerParts:
    binary: Path            # tritonserver
    libraries: Path         # its bundled shared libraries (LD_LIBRARY_PATH)
    backends: Path          # --backend-directory: python/ with libtriton_python.so and this Python's stub
    stub_site: Path         # NumPy 1.x for the Python models (see STUB_NUMPY)

    def env(self) -> dict:
        """The server's environment: its libraries first, and this interpreter's import path for the
        Python models (the stub embeds the system's libpython of the same version)."""
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(self.libraries), env.get("LD_LIBRARY_PATH")]))
        env[PATH_VARIABLE] = os.pathsep.join([str(self.stub_site), *import_path()])
        env.setdefault("OMP_NUM_THREADS", "1")       # one ONNX Runtime thread per model instance
        return env


PATH_VARIABLE = "TOMA_EXPORT_PYTHONPATH"


def import_path() -> list[str]:
    """This interpreter's import path without its standard library: the stub embeds the system's Python
    of the same version, which ignores PYTHONPATH, so model.py puts these folders first on sys.path itself."""
    stdlib = {str(Path(sys.base_prefix) / "lib" / f"python{_python_tag()}"),
              str(Path(sys.base_prefix) / "lib" / f"python{_python_tag()}" / "lib-dynload")}
    paths = [str(Path(p).resolve()) for p in sys.path if p and Path(p).is_dir()]
    return [p for p in dict.fromkeys(paths) if p not in stdlib]


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def find() -> ServerParts:
    """The installed parts, or a MissingComponent that says how to install them."""
    root = home()
    parts = ServerParts(root / "wheel" / "pytriton" / "tritonserver" / "bin" / "tritonserver",
                        root / "wheel" / "nvidia_pytriton.libs", root / "backends", root / "stub-site")
    if not (root / ".complete").is_file() or not parts.binary.is_file():
        raise MissingComponent(f"no tritonserver in {root}; {INSTALL_HINT}, or `make venv` does it")
    stub = parts.backends / "python" / "triton_python_backend_stub"
    if not stub.is_file():
        raise MissingComponent(f"{root} has no Python backend stub for Python {_python_tag()} (nvidia-pytriton "
                               f"{PYTRITON_VERSION} bundles 3.8 to 3.13); run `toma-export serve --install` with "
                               "this Python")
    if not (parts.stub_site / "numpy").is_dir():
        raise MissingComponent(f"{root} lacks NumPy {STUB_NUMPY} for the Python backend; {INSTALL_HINT}")
    missing = _missing_libraries(stub, parts)
    if missing:
        raise MissingComponent(f"the Python backend stub cannot find {', '.join(missing)}; install the shared "
                               f"Python library of this version (e.g. `apt-get install libpython{_python_tag()}`)")
    return parts


def _missing_libraries(binary: Path, parts: ServerParts) -> list[str]:
    try:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=parts.env(), timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []                          # no ldd: the server's own error will say it
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


def _download(spec: str, pattern: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), spec]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(pattern))
    if done.returncode or not found:
        last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise MissingComponent(f"could not download {spec} ({last}); download the wheels where PyPI is reachable "
                               "and pass them: toma-export serve --install --wheel FILE [--wheel FILE]")
    return found[0]


def install(progress=None, wheels=()) -> ServerParts:
    """Download nvidia-pytriton and NumPy 1.x (pinned, without dependencies) and unpack the server parts; a
    no-op when they are there. `wheels`: wheel files already downloaded (offline machines)."""
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    with contextlib.suppress(MissingComponent):
        return find()
    root = home()
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{root.name}.tmp-", dir=root.parent) as tmp:
        tmp = Path(tmp)
        given = {Path(w).name.split("-")[0]: Path(w) for w in wheels or ()}
        wheel = given.get("nvidia_pytriton")
        if wheel is None:
            progress(f"[serve] downloading nvidia-pytriton=={PYTRITON_VERSION} (the tritonserver binary, "
                     "about 55 MB; not installed into the environment)")
            wheel = _download(f"nvidia-pytriton=={PYTRITON_VERSION}", "nvidia_pytriton-*.whl", tmp / "dl")
        numpy_wheel = given.get("numpy") or _download(f"numpy=={STUB_NUMPY}", "numpy-*.whl", tmp / "dl")
        progress(f"[serve] unpacking {Path(wheel).name} into {root}")
        staged = tmp / "parts"
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/"))]
            zf.extractall(staged / "wheel", members)
        server = staged / "wheel" / "pytriton" / "tritonserver"
        (server / "bin" / "tritonserver").chmod(0o755)
        python = staged / "backends" / "python"
        python.mkdir(parents=True)
        for f in (server / "backends" / "python").iterdir():
            shutil.copy2(f, python / f.name)
        stub = server / "python_backend_stubs" / _python_tag() / "triton_python_backend_stub"
        if not stub.is_file():
            raise MissingComponent(f"nvidia-pytriton {PYTRITON_VERSION} has no Python backend stub for Python "
                                   f"{_python_tag()}; use Python 3.8 to 3.13")
        shutil.copy2(stub, python / stub.name)
        (python / stub.name).chmod(0o755)
        with zipfile.ZipFile(numpy_wheel) as zf:
            zf.extractall(staged / "stub-site")
        (staged / ".complete").write_text(f"nvidia-pytriton {PYTRITON_VERSION}\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(staged, root)
    return find()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOOPBACK = "127.0.0.1"


class Server:
    """A running tritonserver process on a repository. Use as a context manager, or start() / stop().

    It listens on `address` for HTTP, gRPC and metrics alike: loopback by default, because the server has no
    authentication of its own; 0.0.0.0 exposes it on every interface on purpose (in a container, behind a
    proxy). `extra_args` go to tritonserver as they are (e.g. --http-restricted-api).

    With `recover` (the default) the models load through Triton's repository API (explicit model control) and
    a `recovery.Watchdog` reloads a model whose worker process died; `recoveries` lists each reload. `models`
    names the repository's models to load (explicit model control too); None loads every one."""

    def __init__(self, repo, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 log=None, parts: ServerParts | None = None, extra_args=(), address: str = LOOPBACK,
                 recover: bool = True, progress=None, models=None):
        self.repo = Path(repo).expanduser().resolve()
        if not self.repo.is_dir():
            raise UsageError(f"model repository {self.repo} does not exist; write one with `toma-export export-repo`")
        try:
            socket.getaddrinfo(address, None, proto=socket.IPPROTO_TCP, flags=socket.AI_NUMERICHOST)
        except (socket.gaierror, UnicodeError):
            raise UsageError(f"--address {address!r} is not an IP address; pass 127.0.0.1 (this machine only, the "
                             "default) or 0.0.0.0 (every interface)") from None
        self.parts = parts or find()
        self.address = address
        self.ports = dict(http=http_port, grpc=grpc_port, metrics=metrics_port)
        self.log = log                   # a file to write the server's output to (default: inherit stderr)
        self.extra_args = list(extra_args)
        if recover and any(a.startswith("--model-control-mode") for a in self.extra_args):
            raise UsageError("--model-control-mode is set by serve itself (explicit: its watchdog reloads a model "
                             "whose worker died); leave it out, or pass --no-recover to choose your own mode")
        self.models = list(dict.fromkeys(models)) if models else None
        if self.models:
            if any(a.startswith(("--model-control-mode", "--load-model")) for a in self.extra_args):
                raise UsageError("--model loads the named models with explicit model control; leave "
                                 "--model-control-mode and --load-model out")
            found = sorted(p.name for p in self.repo.iterdir() if (p / "config.pbtxt").is_file())
            for name in self.models:
                if name not in found:
                    raise UsageError(f"--model {name}: no such model in {self.repo} (it holds "
                                     f"{', '.join(found) or 'none'}); pass one of those")
        self.recover = recover
        self.progress = progress or (lambda message: print(message, file=sys.stderr, flush=True))
        self.process: subprocess.Popen | None = None
        self.watchdog: recovery.Watchdog | None = None

    @property
    def exposed(self) -> bool:
        """Listening on every interface rather than one address."""
        return self.address in ("0.0.0.0", "::")

    @property
    def host(self) -> str:
        """Where a client on this machine reaches the server."""
        return LOOPBACK if self.exposed else self.address

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports['grpc']}"

    def command(self) -> list[str]:
        return [str(self.parts.binary), f"--model-repository={self.repo}",
                f"--backend-directory={self.parts.backends}",
                f"--http-address={self.address}", f"--http-port={self.ports['http']}",
                f"--grpc-address={self.address}", f"--grpc-port={self.ports['grpc']}",
                f"--metrics-address={self.address}", f"--metrics-port={self.ports['metrics']}",
                "--exit-timeout-secs=30", *self._model_control(), *self.extra_args]

    def _model_control(self) -> list[str]:
        """Explicit model control where recovery reloads models or only some are served."""
        if not (self.recover or self.models):
            return []
        return ["--model-control-mode=explicit", *(f"--load-model={m}" for m in self.models or ["*"])]

    def start(self, timeout: float = 300.0) -> "Server":
        """Start the server and wait until every model it loads (`models`, or the whole repository) is ready."""
        out = open(self.log, "ab") if self.log else None       # noqa: SIM115 (closed in stop)
        self._out = out
        self.process = subprocess.Popen(self.command(), env=self.parts.env(), stdout=out, stderr=subprocess.STDOUT
                                        if out else None, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                where = f"; its log: {self.log}" if self.log else " (its log is above)"
                raise ExecutionError(f"tritonserver exited with status {code} before it was ready (a model "
                                     f"failed to load?){where}")
            if self.ready():
                if self.recover:
                    self.watchdog = recovery.Watchdog(self.process.pid, self.http_url,
                                                      recovery.repository_headers(self.extra_args),
                                                      self.progress).start()
                return self
            time.sleep(0.5)
        self.stop()
        raise ExecutionError(f"tritonserver was not ready after {timeout:.0f} s on {self.repo}")

    @property
    def recoveries(self) -> list[dict]:
        """The reloads after a worker died, each {model, lost, seconds}."""
        return self.watchdog.recoveries if self.watchdog else []

    def ready(self) -> bool:
        return self._answers_ok("health/ready")

    def model_ready(self, model: str) -> bool:
        """Triton's readiness of one model (what a load balancer polls). Plain HTTP: safe from any thread."""
        return self._answers_ok(f"models/{model}/ready")

    def _answers_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/{path}", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, which Triton answers with a graceful shutdown (in-flight requests finish); SIGKILL after
        `timeout`. Returns the exit status."""
        if self.watchdog is not None:
            self.watchdog.stop()
        proc, self.process = self.process, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            code = proc.returncode
        if getattr(self, "_out", None):
            self._out.close()
            self._out = None
        return code

    def __enter__(self) -> "Server":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
