"""The Triton selection kernel on CPU under TRITON_INTERPRET=1, and its ahead-of-time compile to PTX."""
import json
import os
import subprocess
import sys

import pytest
import torch

from toma_export import facility_location
from toma_export.toma.selection import TIE_TOL

triton = pytest.importorskip("triton", reason="needs triton (installed by make test)")
from toma_export.plugins.select_kernel import launch  # noqa: E402

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the kernel on CPU under TRITON_INTERPRET=1 (set by conftest)")


def clustered(p, n, c, k, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(p, k, c, generator=g)
    owner = torch.randint(0, k, (p, n), generator=g)
    return centres.gather(1, owner.unsqueeze(-1).expand(-1, -1, c)) + 0.05 * torch.randn(p, n, c, generator=g)


@interpreted
@pytest.mark.parametrize("p,n,c,k", [(48, 16, 24, 8), (16, 64, 40, 16), (12, 4, 3, 2), (9, 6, 70, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_equals_reference(p, n, c, k, dtype):
    for x in (clustered(p, n, c, k, seed=n), torch.randn(p, n, c, generator=torch.Generator().manual_seed(c))):
        x = x.to(dtype)
        assert torch.equal(facility_location(x, k, impl="triton"), facility_location(x, k))


@interpreted
def test_kernel_handles_duplicates_and_int32_outputs():
    x = torch.ones(4, 16, 8)
    out = launch(x, 6, TIE_TOL, out=torch.empty(4, 6, dtype=torch.int32))
    assert out.dtype == torch.int32 and out.tolist() == [list(range(6))] * 4


@interpreted
def test_reuse_flag_returns_previous_destinations():
    x = torch.full((5, 16, 8), float("nan"))                   # computing on these would give garbage
    previous = torch.randint(0, 16, (5, 8))
    assert torch.equal(launch(x, 8, TIE_TOL, previous=previous, recompute=torch.tensor(False)), previous)
    fresh = launch(clustered(5, 16, 8, 8, 0), 8, TIE_TOL, previous=previous, recompute=torch.tensor(True))
    assert not torch.equal(fresh, previous)


@interpreted
def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        facility_location(torch.randn(2, 16, 4), 4, impl="triton")
    with pytest.raises(ValueError, match="impl must be 'torch' or 'triton'"):
        facility_location(torch.randn(2, 16, 4), 4, impl="cuda")


@pytest.mark.parametrize("dtype,capability", [("float16", 90), ("bfloat16", 89), ("float32", 80)])
def test_ahead_of_time_compile_gives_ptx_without_a_gpu(dtype, capability):
    """What the TensorRT plugin's aot_impl embeds in engines (FLUX width 3072, 4x4 tiles, 8 destinations).
    Compiled in a fresh process: the interpreter mode of this one has no compiler behind it."""
    code = ("import json, sys; from toma_export.plugins.select_kernel import compile_ptx; "
            f"k = compile_ptx({dtype!r}, 'int64', 16, 3072, 8, {TIE_TOL!r}, {capability}); "
            "json.dump(dict(name=k.metadata.name, warps=k.metadata.num_warps, ptx=k.asm['ptx']), sys.stdout)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    kernel = json.loads(res.stdout)
    assert kernel["name"] == "select_kernel" and kernel["warps"] >= 1
    assert f".target sm_{capability}" in kernel["ptx"] and ".entry select_kernel" in kernel["ptx"]
