"""Engine builds with TensorRT-RTX, which builds ahead of time on this CPU machine: the parser must take
every exported graph (the selection body inlined) and the builder must write an engine."""
import json
import subprocess
import sys

import pytest

import toma_export as te
from toma_export.trt import BuildOptions, EngineMismatch, build, check_engine
from toma_export.trt.backend import BackendMissing, load

trt_rtx = pytest.importorskip("tensorrt_rtx", reason="needs tensorrt-rtx-cu13 (installed by make test)")
RTX = BuildOptions(backend="tensorrt-rtx")
quiet = dict(progress=lambda m: None)


@pytest.mark.parametrize("name,toma,static", [
    ("flux-tiny", True, False), ("sdxl-tiny", True, False),      # dynamic profiles, ToMA on
    ("flux-tiny", False, True), ("sdxl-tiny", False, True),      # static shapes, the baseline without ToMA
    ("sdxl-tiny", True, True),
])
def test_rtx_builds_every_exported_graph(artifacts, dynamic_export, name, toma, static):
    if toma and not static:
        dynamic_export(name)                                     # reuse the export the ONNX tests made
    meta = build(name, te.ToMAConfig() if toma else None, artifacts,
                 BuildOptions(backend="tensorrt-rtx", static=static), **quiet)
    engine = open(meta["engine"], "rb").read()
    assert len(engine) == meta["engine_bytes"] > 100_000
    assert meta["backend"] == "tensorrt-rtx" and meta["target"] == "sm89" and meta["dynamic"] is not static
    assert meta["selection"] == ("inlined ONNX body" if toma else "none (ToMA off)")
    assert bool(meta["profiles"]) is not static
    if toma:
        assert any(i["name"] == "toma_recompute" for i in meta["inputs"])
    again = build(name, te.ToMAConfig() if toma else None, artifacts,
                  BuildOptions(backend="tensorrt-rtx", static=static), **quiet)
    assert again["engine"] == meta["engine"] and again["build_seconds"] == meta["build_seconds"]   # reused


def test_cli_build_json_and_other_target(artifacts, dynamic_export):
    dynamic_export("flux-tiny")
    res = subprocess.run([sys.executable, "-m", "toma_export.cli", "build", "--model", "flux-tiny", "--backend",
                          "tensorrt-rtx", "--target", "sm86", "--output-dir", str(artifacts), "--json"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads(res.stdout)
    assert meta["target"] == "sm86" and meta["engine"].endswith("engine.plan") and meta["onnx"].endswith("model.onnx")
    assert meta["selection"] == "inlined ONNX body" and meta["build_seconds"] > 0


def test_engine_from_another_version_is_refused(artifacts, dynamic_export, tmp_path):
    dynamic_export("flux-tiny")
    meta = build("flux-tiny", te.ToMAConfig(), artifacts, RTX, **quiet)
    info = json.loads(open(meta["engine"].replace("engine.plan", "engine.json")).read())
    stale = tmp_path / "engine.json"
    stale.write_text(json.dumps(dict(info, backend_version="1.0.0.1")))
    with pytest.raises(EngineMismatch, match=r"built by tensorrt-rtx 1.0.0.1 but 1.7.* is installed; rebuild"):
        check_engine(stale)
    stale.write_text(json.dumps(dict(info, plugin_version="1.0000000000")))
    with pytest.raises(EngineMismatch, match="embeds toma plugin 1.0000000000 but this toolkit has"):
        check_engine(stale)


def test_bad_build_requests_are_clear_errors(artifacts):
    with pytest.raises(ValueError, match="target 'sm90' is not one TensorRT-RTX builds for"):
        build("flux-tiny", te.ToMAConfig(), artifacts, BuildOptions(backend="tensorrt-rtx", target="sm90"), **quiet)
    with pytest.raises(ValueError, match="backend must be one of tensorrt, tensorrt-rtx"):
        load("onnxruntime")
    try:
        load("tensorrt")
    except BackendMissing as err:
        assert "pip install tensorrt-rtx-cu13" in str(err) and "backend 'tensorrt' is not usable" in str(err)
