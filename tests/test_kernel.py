"""The Triton selection kernel on CPU under TRITON_INTERPRET=1, its ahead-of-time compile to PTX for TensorRT,
and the choice of the PTX ISA version."""
import json
import os
import subprocess
import sys

import pytest
import torch

from toma_export import facility_location
from toma_export.plugins import ptx
from toma_export.toma.selection import TIE_TOL, recompute_flag

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
    assert torch.equal(launch(x, 8, TIE_TOL, previous=previous, recompute=recompute_flag(False)), previous)
    fresh = launch(clustered(5, 16, 8, 8, 0), 8, TIE_TOL, previous=previous, recompute=recompute_flag(True))
    assert not torch.equal(fresh, previous)


@interpreted
def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        facility_location(torch.randn(2, 16, 4), 4, impl="triton")
    with pytest.raises(ValueError, match="impl must be 'torch' or 'triton'"):
        facility_location(torch.randn(2, 16, 4), 4, impl="cuda")


def compile_in_fresh_process(code: str) -> subprocess.CompletedProcess:
    """Compile in a fresh process: the interpreter mode of this one has no compiler behind it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.parametrize("dtype,capability,ptx", [("float16", 90, 84), ("bfloat16", 89, 80), ("float32", 80, 88)])
def test_ahead_of_time_compile_gives_ptx_without_a_gpu(dtype, capability, ptx):
    """What the TensorRT plugin's aot_impl embeds in engines (FLUX width 3072, 4x4 tiles, 8 destinations), at
    the PTX ISA version asked for (Triton alone would write its newest, 9.4, which older drivers refuse)."""
    code = ("import json, sys, dataclasses; from toma_export.plugins.select_kernel import compile_ptx; "
            f"k = compile_ptx({dtype!r}, 'int64', 16, 3072, 8, {TIE_TOL!r}, {capability}, {ptx}); "
            "json.dump(dataclasses.asdict(k), sys.stdout)")
    res = compile_in_fresh_process(code)
    assert res.returncode == 0, res.stderr[-2000:]
    kernel = json.loads(res.stdout)
    assert kernel["name"] == "select_kernel" and kernel["num_warps"] >= 1 and kernel["ptx_version"] == ptx
    assert f".target sm_{capability}" in kernel["ptx"] and ".entry select_kernel" in kernel["ptx"]
    assert f".version {ptx // 10}.{ptx % 10}\n" in kernel["ptx"]


def test_128_token_fp32_tiles_fit_the_default_shared_memory():
    """A 128-token fp32 tile with 64-wide channel chunks would stage 64 KiB; TensorRT launches AOT kernels with
    the 48 KiB default, so the channels are streamed in narrower chunks. The staged features are the kernel's
    shared memory whatever the destination count (32 KiB for 8 destinations and for 64, measured), so 8 keep
    the compile at about 12 s instead of 60."""
    from toma_export.plugins.select_kernel import SHARED_LIMIT, block_sizes

    assert block_sizes(128, 3072, "float32") == (128, 32) and block_sizes(128, 3072, "float16") == (128, 64)
    code = ("import json, sys; from toma_export.plugins.select_kernel import compile_ptx; "
            f"k = compile_ptx('float32', 'int64', 128, 3072, 8, {TIE_TOL!r}, 90, 84); json.dump(k.shared, sys.stdout)")
    res = compile_in_fresh_process(code)
    assert res.returncode == 0, res.stderr[-2000:]
    assert 0 < json.loads(res.stdout) <= SHARED_LIMIT


def test_a_kernel_tensorrt_cannot_launch_is_refused():
    """Over the shared-memory budget (lowered here to 1 KiB) the compile refuses, naming the fix."""
    code = ("import toma_export.plugins.select_kernel as sk; sk.SHARED_LIMIT = 1024; "
            f"sk.compile_ptx('float32', 'int64', 16, 64, 8, {TIE_TOL!r}, 90, 84)")
    res = compile_in_fresh_process(code)
    assert res.returncode == 1
    assert "KernelUnfit: the toma::ToMASelect kernel (16-token tiles, 64 float32 channels, sm_90) needs" in res.stderr
    assert "use smaller tiles (--tile) or --selection body" in res.stderr


@pytest.mark.parametrize("cuda,expected", [((12, 4), 84), ((12, 6), 85), ((12, 8), 87), ((13, 0), 90), ((13, 4), 94),
                                           ((11, 8), 78)])
def test_ptx_isa_a_driver_loads(cuda, expected):
    assert ptx.for_cuda(*cuda) == expected


def test_ptx_version_choice(monkeypatch):
    monkeypatch.setattr(ptx, "driver_cuda", lambda: None)
    assert ptx.choose(90) == (84, "default: no CUDA driver to read")              # AOT builds, tests
    assert ptx.choose(90, 88) == (88, "--ptx-version")
    assert ptx.choose(100)[0] == 86                                                # sm_100 needs PTX 8.6
    with pytest.raises(ValueError, match=r"--ptx-version 70 is outside what sm_90 kernels from Triton can declare "
                                         r"\(80..94"):
        ptx.choose(90, 70)
    with pytest.raises(ValueError, match=r"--ptx-version 90 is outside what sm_80 kernels from Triton can declare "
                                         r"\(80..88"):
        ptx.choose(80, 90)                                                         # Triton's sm_80 ptxas: 8.8
    monkeypatch.setattr(ptx, "driver_cuda", lambda: (12, 2))
    assert ptx.choose(90) == (82, "the installed CUDA 12.2 driver")
    monkeypatch.setattr(ptx, "driver_cuda", lambda: (13, 9))
    assert ptx.choose(90)[0] == 94                                                 # Triton's newest
    monkeypatch.setattr(ptx, "driver_cuda", lambda: (11, 8))
    with pytest.raises(ValueError, match="CUDA 11.8 driver loads PTX ISA up to 7.8, but sm_90 kernels need 8.0"):
        ptx.choose(90)
