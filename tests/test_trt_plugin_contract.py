"""The toma::ToMASelect plugin against NVIDIA's own `tensorrt.plugin` package, as TensorRT's parser and
builder drive it: registration, the creator called with the parser's fields, output types and symbolic
shapes for a dynamic batch and tile count, AOT launch parameters, extra arguments and PTX, and the JIT
callback on bf16 features.

Real: NVIDIA's `tensorrt.plugin` (pure Python, from the tensorrt-cu12-bindings wheels of the versions
below), TensorRT-RTX's compiled bindings, our plugin, the Triton compiler and (JIT, on CPU under
TRITON_INTERPRET=1) the kernel, and the exported ONNX node. Stand-in: the parser/builder call sequence, the
symbolic shape expressions and three AOT-only classes TensorRT-RTX lacks (tests/trt_standin.py says which).
The wheels are cached in ~/.cache/toma-export/wheels (TOMA_WHEEL_CACHE moves it); the tests skip only when
the package registry cannot be reached.
"""
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("tensorrt_rtx", reason="needs tensorrt-rtx-cu13 (installed by make test)")
pytest.importorskip("triton", reason="needs triton (installed by make test)")

# the first version with AOT Python plugins, a later 10.x, and the newest 11.x
VERSIONS = ["10.9.0.34", "10.13.3.9", "11.4.0.106"]
CACHE = Path(os.environ.get("TOMA_WHEEL_CACHE", Path.home() / ".cache" / "toma-export" / "wheels"))
UNREACHABLE = ("NewConnectionError", "Name or service not known", "Temporary failure in name resolution",
               "Network is unreachable", "Max retries exceeded", "ConnectTimeout", "ProxyError")
B, T, N, C = 2, 12, 16, 32          # batch and tiles (symbolic in the engine), tile tokens and channels


def plugin_package(version: str) -> Path:
    """NVIDIA's plugin package of one TensorRT version: the folder holding plugin/, from the cached wheel."""
    root = CACHE / f"tensorrt-{version}"
    if (root / "plugin" / "__init__.py").is_file():
        return root
    wheels = sorted(CACHE.glob(f"tensorrt_cu12_bindings-{version}-*.whl"))
    if not wheels:
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "1", "--timeout",
                              "30", "-d", str(CACHE), f"tensorrt-cu12-bindings=={version}"],
                             capture_output=True, text=True, timeout=600)
        if res.returncode:
            if any(s in res.stdout + res.stderr for s in UNREACHABLE):
                pytest.skip(f"the package registry cannot be reached to fetch tensorrt-cu12-bindings {version}")
            raise AssertionError(f"pip download tensorrt-cu12-bindings=={version} failed: {res.stderr[-1500:]}")
        wheels = sorted(CACHE.glob(f"tensorrt_cu12_bindings-{version}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        members = [m for m in z.namelist() if m.startswith("tensorrt_bindings/plugin/") and m.endswith(".py")]
        assert members, f"{wheels[0].name} has no tensorrt_bindings/plugin package"
        for m in members:
            target = root / m[len("tensorrt_bindings/"):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(m))
    return root


def drive(version: str, onnx_path: str, phase: str, report: Path, features="float32,bfloat16") -> dict:
    """One fresh process per version and phase: it replaces the `tensorrt` module."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    if phase == "jit":
        env["TRITON_INTERPRET"] = "1"                  # the JIT callback's kernel runs on host buffers
    args = [sys.executable, str(Path(__file__).with_name("trt_standin.py")), "--package", str(plugin_package(version)),
            "--version", version, "--onnx", onnx_path, "--phase", phase, "--features", features,
            "--batch", str(B), "--tiles", str(T), "--tile-tokens", str(N), "--channels", str(C),
            "--report", str(report)]
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def node_file(dynamic_export):
    return dynamic_export("flux-tiny")["onnx"]


def entry_params(ptx: str) -> list[str]:
    """The .param types of the PTX .entry, in order."""
    head = ptx[ptx.index(".entry"):]
    head = head[:head.index(")")]
    return re.findall(r"\.param\s+\.(\w+)", head)


@pytest.mark.parametrize("version", VERSIONS)
def test_aot_plugin_as_tensorrt_builds_it(node_file, version, tmp_path):
    report = drive(version, node_file, "aot", tmp_path / "report.json")
    assert Path(report["tensorrt_plugin"]).is_relative_to(CACHE)         # NVIDIA's package, not a copy of ours
    assert report["registered"] and report["declared_fields"] == ["num_dst", "tie_tol"]
    assert report["io_onnx_types"] == ["FLOAT", "INT64", "INT32", "INT64"]   # tiles, previous, recompute -> dst
    for features, case in report["cases"].items():
        assert case["passed_fields"] == ["num_dst", "tie_tol"]
        assert case["plugin_class"] == "_TemplateAOTPlugin"
        assert case["attrs"]["num_dst"][1:] == ["int32", [8]]
        assert case["attrs"]["tie_tol"][1] == "float32" and case["attrs"]["tie_tol"][2][0] == pytest.approx(1e-4)
        assert case["num_outputs"] == 1 and case["output_types"] == ["DataType.INT64"]
        assert case["output_shape"] == [B, T, 8]
        assert "DataType.BOOL" not in case["io_types"]
        # one program per tile of the (symbolic) batch x tile grid, 4 warps, shared memory in the default 48 KiB
        launch = case["launch"]
        assert (launch["grid_x"], launch["grid_y"], launch["grid_z"]) == (B * T, 1, 1)
        assert (launch["block_x"], launch["block_y"], launch["block_z"]) == (128, 1, 1)
        assert 0 < launch["shared_mem"] <= 48 * 1024
        assert case["extra_args"] == [[N, "PluginArgDataType.INT32"], [C, "PluginArgDataType.INT32"]]
        ptx = case["ptx"]
        assert case["kernel_name"] == "select_kernel" and f".entry {case['kernel_name']}(" in ptx
        assert ".version 8.4" in ptx and ".target sm_90a" in ptx
        # TensorRT passes tiles, previous, recompute (pointers), n and C (int32), destinations (pointer); the
        # two trailing .u64 are Triton's scratch pointers, padded with null (sizes checked 0 when compiling)
        params = entry_params(ptx)
        assert params[:6] == ["u64", "u64", "u64", "u32", "u32", "u64"], (features, params)
        assert params[6:] == ["u64", "u64"]


@pytest.mark.parametrize("version", VERSIONS)
def test_jit_plugin_runs_the_kernel_on_bf16_and_fp32(node_file, version, tmp_path):
    report = drive(version, node_file, "jit", tmp_path / "report.json")
    for features, case in report["cases"].items():
        assert case["plugin_class"] == "_TemplateJITPlugin"
        assert case["jit"] == {"recompute": True, "reuse": True}, features
        assert case["serialized_fields"] == ["num_dst", "tie_tol"]
