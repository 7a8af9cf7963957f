"""TensorRT backend: an engine (toma_export.trt.runner.EngineRunner deserializes and version-checks it)
run from persistent device buffers, replayed as a CUDA graph when its shapes are static.

Why: EngineRunner allocates outputs per call, which is fine for parity checks; a denoising loop calls the
same shapes 20-50 times, so buffers are allocated and their addresses set once per input signature, inputs
are copied in, and the enqueue is captured once per signature and replayed (a new signature sets new shapes
and captures again; the ToMA selection is a data-dependent select inside the graph, not host control flow,
so one capture serves recompute and reuse steps alike). Needs CUDA and TensorRT; nothing here runs on a CPU-only machine.
"""
from __future__ import annotations

import logging

import torch

from ..errors import ExecutionError, MissingComponent

log = logging.getLogger("toma_export")


class EngineGraph:
    def __init__(self, engine_json, cuda_graphs: bool = True):
        if not torch.cuda.is_available():
            raise MissingComponent("the tensorrt backend needs a CUDA GPU; use --backend onnxruntime (the CPU fallback)")
        from ..trt.runner import EngineRunner, _torch_dtype

        self.runner = EngineRunner(engine_json)
        self.meta = self.runner.meta
        self.trt, self.engine, self.context = self.runner.trt, self.runner.engine, self.runner.context
        self.inputs = [i["name"] for i in self.meta["inputs"]]
        self.outputs = self.runner.outputs
        self.dtypes = {n: _torch_dtype(self.trt, torch, self.engine.get_tensor_dtype(n))
                       for n in self.inputs + self.outputs}
        self.cuda_graphs = cuda_graphs
        self.stream = torch.cuda.Stream()
        self.slots: dict = {}

    @property
    def provider(self) -> str:
        return f"{self.meta['backend']} {self.meta['backend_version']}"

    def run(self, feeds: dict) -> dict:
        """feeds: {name: tensor}; returns {name: CUDA tensor} (copies: the buffers are reused next call)."""
        signature = tuple((n, tuple(feeds[n].shape)) for n in self.inputs)
        slot = self.slots.get(signature) or self._allocate(signature)
        for n in self.inputs:
            slot["in"][n].copy_(torch.as_tensor(feeds[n]), non_blocking=True)
        torch.cuda.current_stream().synchronize()        # inputs written before our stream reads them
        if slot.get("graph") is not None:
            slot["graph"].replay()
        else:
            self._enqueue(self.stream)                   # also the warm-up before a capture
            if self.cuda_graphs and "graph" not in slot:
                slot["graph"] = self._capture()          # None when capture failed: plain enqueues from now on
        torch.cuda.synchronize()
        return {n: t.clone() for n, t in slot["out"].items()}

    def _allocate(self, signature) -> dict:
        from ..trt.runner import set_input_shapes

        set_input_shapes(self.context, self.meta, dict(signature))
        slot = {"in": {}, "out": {}}
        for n, shape in signature:
            slot["in"][n] = torch.empty(shape, dtype=self.dtypes[n], device="cuda")
            self.context.set_tensor_address(n, slot["in"][n].data_ptr())
        for n in self.outputs:
            slot["out"][n] = torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self.dtypes[n], device="cuda")
            self.context.set_tensor_address(n, slot["out"][n].data_ptr())
        self.slots = {signature: slot}   # the context holds one set of addresses: keep the current slot only
        return slot

    def _enqueue(self, stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExecutionError("TensorRT execution failed")

    def _capture(self):
        """Capture one enqueue after a warm-up run; on failure keep plain enqueues (and say so once)."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self._enqueue(self.stream)
            return graph
        except RuntimeError as err:
            log.warning("CUDA graph capture of the TensorRT engine failed (%s); running without", err)
            return None
