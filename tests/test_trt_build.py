"""Engine builds with TensorRT-RTX, which builds ahead of time on this CPU machine: the parser must take
every exported graph (the selection body inlined) and the builder must write an engine."""
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import toma_export as te
from toma_export.trt import BuildOptions, EngineMismatch, build, check_engine
from toma_export.trt.build import choose_selection, describe_selection
from toma_export.trt.backend import BackendMissing, load, version

trt_rtx = pytest.importorskip("tensorrt_rtx", reason="needs tensorrt-rtx-cu13 (installed by make test)")
import trt_standin  # noqa: E402  (tests/: the stand-ins for what needs a GPU or a CUDA driver)

build_module = importlib.import_module("toma_export.trt.build")    # `toma_export.trt.build` names the function
RTX = BuildOptions(backend="tensorrt-rtx")
quiet = dict(progress=lambda m: None)


# A static baseline without ToMA is built by test_build_exports_in_a_child_process (flux-tiny), which checks the
# same fields for it.
@pytest.mark.parametrize("name,toma,static", [
    ("flux-tiny", True, False), ("sdxl-tiny", True, False),      # dynamic profiles, ToMA on
    ("sdxl-tiny", True, True),                                   # static shapes (test_repository's engine)
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
    assert meta["selection_reason"] == ("TensorRT-RTX loads no plugins" if toma else "ToMA off")
    assert describe_selection(meta["selection"], meta["selection_reason"]) == \
        ("inlined ONNX body (TensorRT-RTX loads no plugins)" if toma else "none (ToMA off)")   # said once
    assert meta["ptx_version"] is None and meta["plugin_version"] is None
    assert bool(meta["profiles"]) is not static
    if toma:
        assert any(i["name"] == "toma_recompute" for i in meta["inputs"])
    again = build(name, te.ToMAConfig() if toma else None, artifacts,
                  BuildOptions(backend="tensorrt-rtx", static=static), **quiet)
    assert again["engine"] == meta["engine"] and again["build_seconds"] == meta["build_seconds"]   # reused


def cli(*args):
    return subprocess.run([sys.executable, "-m", "toma_export.cli", *args], capture_output=True, text=True,
                          timeout=900)


def test_cli_build_json_and_other_target(artifacts, dynamic_export, cli_here):
    dynamic_export("flux-tiny")
    res = cli_here("build", "--model", "flux-tiny", "--backend", "tensorrt-rtx", "--selection", "body", "--target",
                   "sm86", "--output-dir", artifacts, "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads(res.stdout)
    assert meta["target"] == "sm86" and meta["engine"].endswith("engine.plan") and meta["onnx"].endswith("model.onnx")
    assert meta["selection"] == "inlined ONNX body" and meta["build_seconds"] > 0
    assert meta["selection_reason"] == "--selection body"
    assert meta["plan"] == meta["engine"] and meta["weights"] == meta["onnx"]        # the plan holds those weights
    assert "selection: inlined ONNX body (--selection body)" in res.stderr
    assert meta["peak_rss_gb"] > 0.1 and meta["peak_rss_children_gb"] >= 0      # the export was cached: no child


def test_build_exports_in_a_child_process(tmp_path, monkeypatch):
    """The export's memory leaves with the process that made it. Here torch.onnx in this process fails the test,
    yet build makes the export (none is cached in tmp_path) and the engine, and the child's progress reaches
    this process's callback."""
    def traced_here(*args, **kwargs):
        raise AssertionError("build traced the model in its own process")

    monkeypatch.setattr(torch.onnx, "export", traced_here)
    messages = []
    meta = build("flux-tiny", None, tmp_path, BuildOptions(backend="tensorrt-rtx", static=True),
                 progress=messages.append)
    assert Path(meta["onnx"]).is_file() and Path(meta["onnx"]).parent.parent == tmp_path / "onnx"
    assert Path(meta["engine"]).stat().st_size == meta["engine_bytes"] > 100_000
    assert meta["backend"] == "tensorrt-rtx" and not meta["dynamic"] and not meta["profiles"]   # static, no ToMA
    assert meta["selection"] == "none (ToMA off)" and meta["selection_reason"] == "ToMA off"
    assert any(m.startswith("[export 4/4]") for m in messages) and messages[-1].startswith("[build] wrote")


def test_an_error_in_the_export_process_is_one_line(tmp_path, cli_here):
    """The size check runs after the child has loaded the model; its UsageError comes back as itself."""
    res = cli_here("build", "--model", "flux-tiny", "--backend", "tensorrt-rtx", "--min-size", "96x96",
                   "--output-dir", tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == (
        "toma-export: error: flux-tiny: 96x96 px does not fit the tiles: the height must be a multiple of 64 px "
        "(tile times the merged level's down-sampling)")
    assert "[export 1/4] building flux-tiny" in res.stderr                  # it did get as far as the child


@pytest.mark.parametrize("args,message", [
    (("--selection", "plugin"), "--selection plugin cannot be built: TensorRT-RTX loads no plugins; use --selection "
                                "body (the inlined ONNX body) or auto"),
    (("--selection", "body", "--ptx-version", "84"), "--ptx-version applies to the plugin only"),
])
def test_cli_refuses_an_impossible_selection_in_one_line(tmp_path, args, message, cli_here):
    res = cli_here("build", "--model", "flux-tiny", "--backend", "tensorrt-rtx", *args, "--output-dir", str(tmp_path))
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and not any(tmp_path.iterdir())           # refused before exporting


def test_selection_choice():
    """`auto` takes the plugin only where it can run; `plugin` refuses where it cannot. The TensorRT module
    here is a stand-in carrying a version: full TensorRT cannot be installed on this machine."""
    def trt(version):
        return types.SimpleNamespace(__version__=version)

    assert choose_selection("auto", "tensorrt", trt("10.13.3.9"), cuda=True) == (
        True, "TensorRT 10.13.3.9 with a CUDA GPU")
    assert choose_selection("auto", "tensorrt", trt("11.4.0.106"), cuda=True)[0]
    assert choose_selection("body", "tensorrt", trt("11.4.0.106"), cuda=True) == (False, "--selection body")
    assert choose_selection("auto", "tensorrt", trt("10.8.0.43"), cuda=True) == (
        False, "TensorRT 10.8.0.43 has no AOT Python plugins (10.9 is the first)")
    assert choose_selection("auto", "tensorrt", trt("10.13.3.9"), cuda=False) == (
        False, "there is no CUDA GPU to compile the plugin's kernel for")
    assert choose_selection("auto", "tensorrt-rtx", trt("1.7.1.116"), cuda=True) == (
        False, "TensorRT-RTX loads no plugins")
    with pytest.raises(ValueError, match="--selection plugin cannot be built: TensorRT 10.7.0 has no AOT"):
        choose_selection("plugin", "tensorrt", trt("10.7.0"), cuda=True)
    with pytest.raises(ValueError, match="--selection must be one of auto, plugin, body, got 'kernel'"):
        choose_selection("kernel", "tensorrt", trt("10.13.3.9"), cuda=True)


def test_engine_from_another_version_is_refused(artifacts, dynamic_export, tmp_path):
    dynamic_export("flux-tiny")
    meta = build("flux-tiny", te.ToMAConfig(), artifacts, RTX, **quiet)
    info = json.loads(open(meta["engine"].replace("engine.plan", "engine.json")).read())
    stale = tmp_path / "engine.json"
    shutil.copy(meta["engine"], tmp_path / "engine.plan")        # a complete engine folder, but stale metadata
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


def test_full_tensorrt_is_taken_where_it_imports_and_named_missing_where_not(monkeypatch):
    """Which backend `load` returns, and the error when none can be used.

    Real: the loader, TensorRT-RTX (imported from its wheel) and, on a machine with full TensorRT, the
    `tensorrt` module itself. Full TensorRT cannot be installed on this CPU machine, so the second half drives
    the loader with stand-ins put in sys.modules as `tensorrt`: a module carrying `__version__` and `Builder`
    (what the real wheel exposes), and one without `Builder` (the bare `tensorrt` stub wheel)."""
    assert load("tensorrt-rtx") == ("tensorrt-rtx", trt_rtx)
    tensorrt = importlib.import_module("tensorrt") if importlib.util.find_spec("tensorrt") else None
    if tensorrt is None or not hasattr(tensorrt, "Builder"):     # here: not installed (or the bare stub wheel)
        with pytest.raises(BackendMissing) as err:
            load("tensorrt")
        why = "No module named 'tensorrt'" if tensorrt is None else "module 'tensorrt' has no attribute 'Builder'"
        assert str(err.value).startswith(f"backend 'tensorrt' is not usable (tensorrt: {why})")
        assert "pip install tensorrt-rtx-cu13" in str(err.value)
        assert load(None) == ("tensorrt-rtx", trt_rtx)           # the first backend that imports
    else:                                                       # a machine with full TensorRT: the real module
        assert load("tensorrt") == ("tensorrt", tensorrt)
        assert load(None) == ("tensorrt", tensorrt)              # full TensorRT is preferred over TensorRT-RTX
        assert version(tensorrt) == tensorrt.__version__ and version(tensorrt)[0].isdigit()

    full = types.ModuleType("tensorrt")                          # stand-in: full TensorRT with its bindings
    full.__version__, full.Builder = "10.13.3.9", object
    monkeypatch.setitem(sys.modules, "tensorrt", full)
    assert load("tensorrt") == ("tensorrt", full) and load(None) == ("tensorrt", full)
    assert version(full) == "10.13.3.9"

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))   # stand-in: the stub wheel
    with pytest.raises(BackendMissing, match=r"^backend 'tensorrt' is not usable \(tensorrt: module 'tensorrt' "
                                             r"has no attribute 'Builder'\); install TensorRT"):
        load("tensorrt")
    assert load(None) == ("tensorrt-rtx", trt_rtx)               # the stub is passed over

    monkeypatch.setitem(sys.modules, "tensorrt", None)           # neither imports: one error naming both
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(BackendMissing) as err:
        load(None)
    message = str(err.value)
    assert message.startswith("no TensorRT backend found (tensorrt: ") and "; tensorrt-rtx: " in message
    assert "pip install tensorrt-rtx-cu13" in message


# -- build --weightless --

def test_weightless_is_refused_before_exporting_where_no_cuda_driver_loads(tmp_path, cli_here):
    """Real TensorRT-RTX: it builds ordinary plans here, but a refittable one makes its compiler call the CUDA
    driver (1.7.1, measured on this machine: flux-tiny with REFIT + STRIP_PLAN fails after 10 s with
    `MyelinCheckException: graph_jit.cpp:278: CHECK(status == CUDA_SUCCESS)`). The build probes that with a
    one-layer network before exporting, and refuses in one line."""
    from toma_export.plugins import ptx

    if ptx.driver_cuda() is not None:
        pytest.skip("a CUDA driver loads here, so weightless builds can work (tests/test_gpu.py builds one)")
    assert not build_module._refit_probe(trt_rtx, "refit") and not build_module._refit_probe(trt_rtx, "identical")
    for mode in ([], ["identical"]):
        res = cli_here("build", "--model", "flux-tiny", "--backend", "tensorrt-rtx", "--weightless", *mode,
                       "--output-dir", tmp_path)
        assert res.returncode == 2 and res.stderr == (
            f"toma-export: error: tensorrt-rtx {trt_rtx.__version__} cannot build a refittable plan on this machine: "
            "its refit compiler calls the CUDA driver (libcuda), which is not installed here; build --weightless on "
            "a machine with an NVIDIA driver, or drop --weightless\n")
    assert not any(tmp_path.iterdir())                                     # nothing was exported


def test_weightless_needs_a_known_mode_and_refit_flags():
    with pytest.raises(ValueError, match="--weightless must be one of refit, identical, got 'stripped'"):
        build_module.check_weightless("tensorrt-rtx", trt_rtx, "stripped")
    old = types.SimpleNamespace(__version__="8.6.1", BuilderFlag=types.SimpleNamespace(REFIT=1))   # no STRIP_PLAN
    with pytest.raises(RuntimeError, match=r"^tensorrt 8.6.1 has no BuilderFlag.STRIP_PLAN, which --weightless refit "
                                           r"needs \(TensorRT 10.0\+ has it\); drop --weightless or update tensorrt$"):
        build_module.check_weightless("tensorrt", old, "refit")


@pytest.fixture
def two_weight_sets(dynamic_export, tmp_path, monkeypatch):
    """Weightless builds as on a machine with a CUDA driver, over two exports of one graph.

    Real: TensorRT-RTX's ONNX parser, network and builder config (the flags asserted are read back from it), the
    export and everything build writes. Stand-ins (tests/trt_standin.py): the serialised plan, since TensorRT-RTX
    serialises no refittable plan without a CUDA driver; the driver check; and the exporter, which hands out the
    session's flux-tiny export and a second weight set of its graph (its weights doubled), as a LoRA export would
    be. Returns (base export, other export, queue of exports build takes next, builds recorded)."""
    base = dynamic_export("flux-tiny")
    other = trt_standin.export_with_other_weights(base, tmp_path / "onnx" / "other")
    queue = []
    return base, other, queue, trt_standin.as_if_a_cuda_driver(monkeypatch, queue)


def test_weightless_refit_plan_is_keyed_by_the_graph(two_weight_sets, tmp_path, cli_here):
    base, other, queue, builds = two_weight_sets
    out, messages = tmp_path / "out", []
    queue += [base, other, other]
    first = build("flux-tiny", te.ToMAConfig(), out, BuildOptions(backend="tensorrt-rtx", weightless="refit"),
                  progress=messages.append)
    assert len(builds) == 1 and builds[0]["profiles"] == 1 and builds[0]["layers"] > 100
    assert builds[0]["flags"] == dict(REFIT=True, REFIT_IDENTICAL=False, REFIT_INDIVIDUAL=False, STRIP_PLAN=True)
    assert first["weightless"] == "refit" and first["builder_flags"] == ["REFIT", "STRIP_PLAN"]
    assert first["plan_reused"] is False and first["weights"] == base["onnx"] and first["onnx"] == base["onnx"]
    plan = Path(first["plan"])
    assert plan.parent.name.startswith("flux-tiny-tensorrt-rtx-refit-")
    assert plan.read_bytes() == trt_standin.STANDIN_PLAN
    assert plan.parent != Path(first["engine"]).parent and os.path.samefile(plan, first["engine"])   # a hard link
    assert any(m.startswith("[build] building a tensorrt-rtx 1.7") and "weightless plan (REFIT + STRIP_PLAN)" in m
               for m in messages)

    # the other weight set of the graph, through the CLI: its own engine folder, the same plan, nothing built
    res = cli_here("build", "--model", "flux-tiny", "--backend", "tensorrt-rtx", "--weightless", "--output-dir", out,
                   "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    second = json.loads(res.stdout)
    assert len(builds) == 1 and "nothing to build" in res.stderr
    assert second["plan"] == first["plan"] and second["plan_reused"] is True and second["weights"] == other["onnx"]
    assert second["graph_key"] == first["graph_key"] and second["weights_key"] != first["weights_key"]
    assert second["engine"] != first["engine"] and os.path.samefile(second["engine"], first["plan"])
    assert second["build_seconds"] == first["build_seconds"] and second["engine_bytes"] == first["engine_bytes"]
    loaded = check_engine(Path(second["engine"]).with_name("engine.json"))    # Artifact.load: the plan is beside it
    assert loaded["weights"] == other["onnx"] and loaded["weightless"] == "refit"

    res = cli_here("build", "--model", "flux-tiny", "--backend", "tensorrt-rtx", "--weightless", "--output-dir", out)
    assert res.returncode == 0 and len(builds) == 1 and "[build] reusing" in res.stderr
    assert f"  plan: {first['plan']} (weightless: REFIT + STRIP_PLAN, reused: nothing built)" in res.stdout
    assert f"  weights: {other['onnx']} (refitted into the plan at every load)" in res.stdout


def test_weightless_identical_plan_is_keyed_by_the_weights(two_weight_sets, tmp_path):
    """REFIT_IDENTICAL takes only the weights it was built with: each weight set builds its own plan."""
    base, other, queue, builds = two_weight_sets
    queue += [base, other, base]
    options = BuildOptions(backend="tensorrt-rtx", weightless="identical")
    first, second, third = (build("flux-tiny", te.ToMAConfig(), tmp_path / "out", options, **quiet) for _ in range(3))
    assert [b["flags"] for b in builds] == [dict(REFIT=False, REFIT_IDENTICAL=True, REFIT_INDIVIDUAL=False,
                                                 STRIP_PLAN=True)] * 2           # the third reused the first
    assert first["plan"] == first["engine"] and second["plan"] == second["engine"] != first["engine"]
    assert first["builder_flags"] == ["REFIT_IDENTICAL", "STRIP_PLAN"] and first["weights"] == base["onnx"]
    assert second["weights"] == other["onnx"] and third["engine"] == first["engine"]
