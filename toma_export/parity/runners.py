"""Polygraphy runners for every backend: the PyTorch ToMA graph (polygraphy's own PyTorch runner moves
tensors to CUDA, so this one stays on the CPU), ONNX Runtime (CUDA provider when onnxruntime-gpu is
installed), and TensorRT engines on a GPU."""
from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from ..runtime.onnxruntime import load_session, providers


class TorchRunner(BaseRunner):
    """Runs a ToMAGraph eagerly on the device its weights are on; `graph.last_tiles` then holds the features
    each group selected on."""

    def __init__(self, graph, name: str = "torch"):
        super().__init__(name=name)
        self.graph = graph

    def activate_impl(self):
        pass

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for name in self.graph.input_names:
            meta.add(name, dtype=None, shape=None)
        return meta

    def infer_impl(self, feed_dict):
        weight = next(self.graph.model.parameters())
        args = [torch.as_tensor(np.asarray(feed_dict[n])).to(weight.device) for n in self.graph.input_names]
        # float inputs in the model's dtype: an fp16/bf16 candidate gets the reference's fp32 feeds
        args = [a.to(weight.dtype) if a.is_floating_point() else a for a in args]
        start = time.perf_counter()
        with torch.no_grad():
            outs = self.graph(*args)
        self.inference_time = time.perf_counter() - start
        return OrderedDict((n, o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy())
                           for n, o in zip(self.graph.output_names, outs))

    def deactivate_impl(self):
        pass


def onnxruntime_provider() -> str:
    """The provider sessions will run on: CUDA when onnxruntime-gpu can use it, else CPU."""
    return providers()[0]


def onnxruntime_runner(path: str):
    """(polygraphy OnnxrtRunner over the runtime layer's session, the provider that will run it)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    session = load_session(path)
    return OnnxrtRunner(session, name="onnxruntime"), session.get_providers()[0]


class EngineRunnerAdapter(BaseRunner):
    """A TensorRT engine (toma_export.runtime.tensorrt) as a polygraphy runner; needs a CUDA GPU."""

    def __init__(self, engine_json, name: str = "tensorrt"):
        super().__init__(name=name)
        self.engine_json = engine_json

    def activate_impl(self):
        from ..runtime.tensorrt import EngineRunner
        self.runner = EngineRunner(self.engine_json)

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for i in self.runner.meta["inputs"]:
            meta.add(i["name"], dtype=None, shape=None)
        return meta

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        out = self.runner({k: torch.as_tensor(np.asarray(v)) for k, v in feed_dict.items()})
        self.inference_time = time.perf_counter() - start
        return OrderedDict((k, v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy())
                           for k, v in out.items())

    def deactivate_impl(self):
        del self.runner
