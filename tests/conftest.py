import contextlib
import os
import sys

# Tests never reach a model hub: make loads of real models fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run on CPU tensors in its interpreter. This must be set before torch imports triton;
# scripts/gpu_checks.sh sets TOMA_GPU_CHECKS to run them compiled on CUDA instead.
if not os.environ.get("TOMA_GPU_CHECKS"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# `make test` runs one xdist worker per core: one thread each (torch, ONNX Runtime and the commands they start),
# not two per worker contending for the same cores (measured: 8 min 50 s -> 8 min 3 s for the suite).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import toma_export as te  # noqa: E402


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="session")
def tiny():
    """Load each tiny model once per session; tests must leave them unpatched."""
    cache = {}

    def get(name, dtype=torch.float32):
        if (name, dtype) not in cache:
            cache[name, dtype] = te.models.get(name).load(dtype)
        model = cache[name, dtype]
        te.remove_toma(model)
        return model

    return get


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """One artifact folder per test run, shared by every test and every xdist worker, so an export or engine
    made once is reused by every later test that asks for it. `make test` runs two workers; each has its own
    basetemp inside the run's folder, which is where this one lives. Two workers asking for the same artifact
    at once do not both make it: the second waits for the first (toma_export.artifacts.claimed)."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "artifacts"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def dynamic_export(artifacts):
    """The dynamic ONNX export of a tiny model with default ToMA, made once per run in `artifacts/onnx`,
    which is where `build` looks for its exports, so the engine tests reuse it."""
    from toma_export.onnx import ExportOptions, export

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = export(name, te.ToMAConfig(), artifacts / "onnx", ExportOptions(dynamic=True),
                                 progress=lambda m: None)
        return cache[name]

    return get


@pytest.fixture
def cli_here(capfd):
    """Run a toma-export command in this process and return it as subprocess.run would (returncode, stdout,
    stderr). Output is captured at the file descriptors, as a child's would be, so native libraries' writes
    count too. For commands that end early (refusals, reuse): a fresh interpreter costs 4 s a call."""
    import subprocess

    from toma_export.cli import main

    def run(*args):
        argv = [str(a) for a in args]
        capfd.readouterr()
        try:
            code = main(argv)
        except SystemExit as stop:               # argparse refusing an option
            code = stop.code
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(argv, code, out, err)

    return run


def run(model, inputs):
    return model(**inputs, return_dict=False)[0]


def in_hub_cache(folder, repo_id: str, tmp_path, monkeypatch) -> None:
    """Lay `folder` out as the Hugging Face cache holds a download of `repo_id` (refs/main -> snapshots/<rev>)
    under tmp_path/hub, and point huggingface_hub there (it reads HF_HUB_CACHE once, at import)."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def pipeline_image(pipe, model: str, prompt: str, seed: int, size: int, steps: int):
    """One RGB uint8 image from a diffusers pipeline as the served paths call it: the family's default guidance
    and the graph's fixed pipeline arguments, the seed in its own generator."""
    import numpy as np

    spec = te.models.get(model)
    image = pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=spec.default_guidance,
                 generator=torch.Generator().manual_seed(seed), **spec.pipeline_kwargs()).images[0]
    return np.asarray(image.convert("RGB"))


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# -- one JSON summary of the run, for scripts/gpu_checks.sh (TOMA_CHECKS_JSON names the file) --
_checks: list = []


def pytest_runtest_logreport(report):
    if not os.environ.get("TOMA_CHECKS_JSON") or (report.when != "call" and report.passed):
        return
    entry = dict(test=report.nodeid, outcome=report.outcome, seconds=round(report.duration, 2))
    if report.skipped and isinstance(report.longrepr, tuple):
        entry["reason"] = report.longrepr[2].removeprefix("Skipped: ")
    elif report.failed:
        entry["error"] = report.longreprtext.strip().splitlines()[-1][:500]
    _checks.append(entry)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("TOMA_CHECKS_JSON")
    if not path:
        return
    import json
    import platform

    from toma_export.plugins import ptx

    machine = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.cuda.is_available())
    if torch.cuda.is_available():
        machine.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                       torch_cuda=torch.version.cuda)
    machine.update(driver_cuda=ptx.driver_cuda(), toma_export=te.__file__)
    for name in ("triton", "tensorrt", "onnxruntime", "diffusers"):
        try:
            machine[name] = __import__(name).__version__
        except Exception:   # noqa: BLE001  (absent, or a stub without bindings)
            machine[name] = None
    counts = {k: sum(c["outcome"] == k for c in _checks) for k in ("passed", "failed", "skipped")}
    with open(path, "w") as f:
        json.dump(dict(exit_status=int(exitstatus), counts=counts, machine=machine, checks=_checks), f, indent=2)


@contextlib.contextmanager
def running(server, timeout: float = 600):
    """A module's tritonserver (toma_export.serve.triton_server.Server), started and stopped after the module; its
    log's tail goes to stderr when it never gets ready, as the error names the log only."""
    try:
        server.start(timeout=timeout)
    except Exception:
        print(server.log.read_text()[-5000:], file=sys.stderr)
        raise
    yield server
    server.stop()
