import os

# Tests never reach a model hub: make loads of real models fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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


def run(model, inputs):
    return model(**inputs, return_dict=False)[0]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
