import os

# Tests never reach a model hub: make loads of real models fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run on CPU tensors in its interpreter. This must be set before torch imports triton;
# scripts/gpu_checks.sh sets TOMA_GPU_CHECKS to run them compiled on CUDA instead.
if not os.environ.get("TOMA_GPU_CHECKS"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
    """One artifact folder per test session, so ONNX exports made by one test are reused by the builds."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def dynamic_export(artifacts):
    """The dynamic ONNX export of a tiny model with default ToMA, made once per session in `artifacts/onnx`,
    which is where `build` looks for its exports, so the engine tests reuse it."""
    from toma_export.onnx import ExportOptions, export

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = export(name, te.ToMAConfig(), artifacts / "onnx", ExportOptions(dynamic=True),
                                 progress=lambda m: None)
        return cache[name]

    return get


def run(model, inputs):
    return model(**inputs, return_dict=False)[0]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
