"""An input shape outside an engine's profile is a one-line error, in both engine runners, before anything
touches the GPU. TensorRT's execution context is a stand-in here (it needs a GPU): like TensorRT's, its
set_input_shape returns False for a shape outside the profile."""
import pytest
import torch

from toma_export.runtime.tensorrt import BufferedEngineRunner, EngineRunner, ShapeOutOfProfile, set_input_shapes

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
