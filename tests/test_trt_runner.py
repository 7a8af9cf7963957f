"""The engine runners before anything touches the GPU.

An input shape outside an engine's profile is a one-line error, in both engine runners. TensorRT's execution
context is a stand-in here (it needs a GPU): like TensorRT's, its set_input_shape returns False for a shape
outside the profile.

A weightless engine (`build --weightless`) is refitted at load from its export, every weight, every time.
Deserialising and refitting need a GPU. Real here: the build (TensorRT-RTX's parser and builder config, see
tests/test_trt_build.py), the exports (graph and external data, read with onnx), TensorRT-RTX's Logger and
Weights, and EngineRunner's own code. Stand-ins (tests/trt_standin.py): the serialised plan and the GPU-only
classes Runtime, ICudaEngine, Refitter and OnnxParserRefitter, whose methods, properties and parameter names
are checked against TensorRT-RTX's bindings first.
"""
import inspect
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import trt_standin
from toma_export import ToMAConfig
from toma_export.errors import ArtifactError, ExecutionError
from toma_export.runtime.tensorrt import BufferedEngineRunner, EngineRunner, ShapeOutOfProfile, set_input_shapes
from trt_standin import StandinRefitter, StandinRuntime

META = {"engine": "out/flux-tiny/engine.plan", "model": "flux-tiny",
        "inputs": [{"name": "hidden_states", "dtype": "float32", "shape": ["batch", "seq", 16]},
                   {"name": "toma_recompute", "dtype": "int32", "shape": [1]}],
        "outputs": [{"name": "noise_pred", "dtype": "float32", "shape": ["batch", "seq", 16]}],
        "profiles": {"hidden_states": {"min": [1, 64, 16], "opt": [1, 256, 16], "max": [2, 1024, 16]}}}


class Context:
    """TensorRT's IExecutionContext as far as shapes go: refuses shapes outside the profile."""

    def __init__(self):
        self.shapes = {}

    def set_input_shape(self, name, shape):
        profile = META["profiles"].get(name)
        if profile and not all(lo <= s <= hi for lo, s, hi in zip(profile["min"], shape, profile["max"])):
            return False
        self.shapes[name] = shape
        return True


def runner(cls):
    r = object.__new__(cls)
    r.meta, r.context, r.outputs = META, Context(), ["noise_pred"]
    return r


def test_engine_runner_refuses_a_shape_outside_the_profile():
    with pytest.raises(ShapeOutOfProfile, match=r"^out/flux-tiny/engine.plan: input hidden_states has shape "
                                                r"\(1, 4096, 16\), but its profile takes \(1, 64, 16\) to "
                                                r"\(2, 1024, 16\); rebuild covering it: `toma-export build --model "
                                                r"flux-tiny --min-size HxW --max-size HxW`"):
        runner(EngineRunner)({"hidden_states": torch.zeros(1, 4096, 16), "toma_recompute": torch.ones(1)})


def test_serving_engine_graph_refuses_before_allocating():
    graph = runner(BufferedEngineRunner)
    with pytest.raises(ShapeOutOfProfile, match="input hidden_states has shape \\(3, 256, 16\\)"):
        graph._allocate((("hidden_states", (3, 256, 16)), ("toma_recompute", (1,))))
    assert graph.context.shapes == {}                 # nothing was set past the refused input


def test_static_engine_names_its_one_shape():
    meta = dict(META, profiles={})
    context = Context()
    context.set_input_shape = lambda name, shape: False
    with pytest.raises(ShapeOutOfProfile, match=r"input toma_recompute has shape \(\), but it was built for exactly "
                                                r"\(1,\)"):
        set_input_shapes(context, meta, {"toma_recompute": ()})


# -- weightless engines: refitted at load from their export, every weight, every time --
CONSTRUCTED = {"Runtime", "Refitter", "OnnxParserRefitter"}    # the runner builds these; it gets an engine


def _parameters(doc: str, name: str) -> list[list[str]]:
    """Parameter names (without self) of each overload in a pybind11 docstring."""
    lines = re.findall(rf"^(?:\d+\. )?{name}\((.*)\) ->", doc, re.M)
    return [[p for p in re.findall(r"(?:^|, )(\w+): ", line) if p != "self"] for line in lines]


def test_refit_standins_match_tensorrt_rtx_bindings():
    real = pytest.importorskip("tensorrt_rtx", reason="needs tensorrt-rtx-cu13 (installed by make test)")
    checked = []
    for cls_name, standin in trt_standin.STANDINS.items():
        binding = getattr(real, cls_name)
        for attr, value in vars(standin).items():
            if attr == "__init__" and cls_name not in CONSTRUCTED or attr.startswith("_") and attr != "__init__":
                continue
            if isinstance(value, property):
                assert isinstance(getattr(binding, attr, None), property), f"{cls_name}.{attr} is no property"
                checked.append(f"{cls_name}.{attr}")
            elif callable(value):
                ours = [p for p in inspect.signature(value).parameters if p != "self"]
                theirs = _parameters(getattr(binding, attr).__doc__, attr)
                assert ours in theirs, f"{cls_name}.{attr}{tuple(ours)}: TensorRT-RTX has {theirs}"
                checked.append(f"{cls_name}.{attr}")
    assert {"Runtime.deserialize_cuda_engine", "ICudaEngine.refittable", "Refitter.__init__",
            "Refitter.get_missing_weights", "Refitter.refit_cuda_engine", "OnnxParserRefitter.refit_from_file",
            "OnnxParserRefitter.num_errors", "OnnxParserRefitter.get_error"} <= set(checked)


@pytest.fixture
def weightless(dynamic_export, tmp_path, monkeypatch):
    """Two weightless (refit) engines of one graph: flux-tiny's export, and a copy with its weights doubled; then
    `tensorrt_rtx` replaced by its bindings with the GPU-only classes stood in. Returns (base export, other export,
    base engine.json, other engine.json, the weights' names)."""
    pytest.importorskip("tensorrt_rtx", reason="needs tensorrt-rtx-cu13 (installed by make test)")
    from toma_export.trt import BuildOptions, build

    base = dynamic_export("flux-tiny")
    other = trt_standin.export_with_other_weights(base, tmp_path / "onnx" / "other")
    queue = [base, other]
    builds = trt_standin.as_if_a_cuda_driver(monkeypatch, queue)
    engines = [Path(build("flux-tiny", ToMAConfig(), tmp_path / "out", BuildOptions(backend="tensorrt-rtx",
                                                                                      weightless="refit"),
                          progress=lambda m: None)["engine"]).with_name("engine.json") for _ in range(2)]
    assert len(builds) == 1                           # the second weight set reused the plan
    names = trt_standin.weight_names(base["onnx"])
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", trt_standin.refit_module())
    monkeypatch.setattr(StandinRuntime, "needs", names)
    monkeypatch.setattr(StandinRuntime, "engines", [])
    return base, other, engines[0], engines[1], names


def test_weightless_engine_is_refitted_with_every_weight_of_its_export_at_each_load(weightless):
    from toma_export.onnx.weights import arrays

    base, other, base_engine, other_engine, names = weightless
    assert len(names) == 256                          # flux-tiny: every initializer is a weight
    values = {name: array.ravel() for name, array in arrays(base["onnx"]).items()}
    for engine_json, scale in ((other_engine, 2), (other_engine, 2), (base_engine, 1)):
        runner = EngineRunner(engine_json)
        assert runner.meta["weights"] == (other if scale == 2 else base)["onnx"]
        assert len(runner.engine.refits) == 1        # deserialised afresh, refitted once, in full
        refitted = runner.engine.refits[0]
        assert sorted(refitted) == sorted(names)
        assert all(np.array_equal(refitted[n], values[n] * scale) for n in names)
    assert len(StandinRuntime.engines) == 3          # a load is a deserialisation and a full refit, every time


def test_weightless_engine_folder_can_carry_its_export(weightless, tmp_path):
    """A relative `weights` is read from the engine's folder (a serving repository's copy), and the plan beside
    engine.json is the one loaded: the build's folders may be gone."""
    base, other, base_engine, other_engine, names = weightless
    moved = _edited(other_engine, tmp_path / "moved", weights="weights/model.onnx")
    shutil.copytree(Path(other["onnx"]).parent, moved.parent / "weights")
    shutil.rmtree(Path(other["onnx"]).parent)
    shutil.rmtree(other_engine.parent)
    runner = EngineRunner(moved)
    assert sorted(runner.engine.refits[0]) == sorted(names)


def _edited(engine_json: Path, folder: Path, **changes) -> Path:
    """A copy of an engine folder (its plan beside it) whose engine.json has `changes`."""
    shutil.copytree(engine_json.parent, folder)
    meta = json.loads((folder / "engine.json").read_text())
    (folder / "engine.json").write_text(json.dumps(dict(meta, **changes)))
    return folder / "engine.json"


def test_weightless_engine_refuses_a_missing_or_foreign_export_before_the_gpu(weightless, tmp_path):
    base, other, base_engine, other_engine, names = weightless
    fix = "export it again (`toma-export build --model flux-tiny --weightless refit` exports it and reuses the plan)"
    gone = tmp_path / "gone" / "model.onnx"
    engine = json.loads(other_engine.read_text())["engine"]
    with pytest.raises(ArtifactError, match=re.escape(f"{engine} is a weightless plan refitted at load from {gone}, "
                                                      f"but that export is gone; {fix}")):
        EngineRunner(_edited(other_engine, tmp_path / "e1", weights=str(gone)))

    no_data = tmp_path / "no-data"
    shutil.copytree(Path(other["onnx"]).parent, no_data)
    (no_data / "model.onnx.data").unlink()
    with pytest.raises(ArtifactError, match=r"but its weights file model.onnx.data is gone; export it again"):
        EngineRunner(_edited(other_engine, tmp_path / "e2", weights=str(no_data / "model.onnx")))

    foreign = tmp_path / "foreign"
    shutil.copytree(Path(other["onnx"]).parent, foreign)
    meta = json.loads((foreign / "toma.json").read_text())
    (foreign / "toma.json").write_text(json.dumps(dict(meta, graph_key="0123456789ab")))
    with pytest.raises(ArtifactError, match=r"but it was exported for another graph \(0123456789ab, the plan's is "):
        EngineRunner(_edited(other_engine, tmp_path / "e3", weights=str(foreign / "model.onnx")))

    with pytest.raises(ArtifactError, match=r"but it holds other weights \(export .*\) than the plan was built with "
                                            r"\(.*\), and --weightless identical takes no others; export it again"):
        EngineRunner(_edited(base_engine, tmp_path / "e4", weightless="identical", weights=other["onnx"]))
    assert StandinRuntime.engines == []              # each was refused before anything was deserialised


def test_weightless_engine_refit_failures_are_one_line(weightless, tmp_path, monkeypatch):
    base, other, base_engine, other_engine, names = weightless
    engine = json.loads(other_engine.read_text())["engine"]
    monkeypatch.setattr(StandinRuntime, "needs", names + ["transformer_blocks.9.extra.weight"])
    with pytest.raises(ExecutionError, match=re.escape(f"{other['onnx']} lacks 1 weights that {engine} needs "
                                                       "(transformer_blocks.9.extra.weight); export it again")):
        EngineRunner(other_engine)
    monkeypatch.setattr(StandinRuntime, "needs", names)
    monkeypatch.setattr(StandinRefitter, "fail_refit", True)
    with pytest.raises(ExecutionError, match=re.escape(f"TensorRT could not refit {engine} with the weights of "
                                                       f"{other['onnx']} (see the log above)")):
        EngineRunner(other_engine)
    monkeypatch.setattr(StandinRefitter, "fail_refit", False)
    monkeypatch.setattr(StandinRuntime, "refittable", False)
    with pytest.raises(ArtifactError, match=r"is recorded as weightless but its plan is not refittable; rebuild it: "
                                            r"`toma-export build --model flux-tiny --weightless refit --force`"):
        EngineRunner(other_engine)
