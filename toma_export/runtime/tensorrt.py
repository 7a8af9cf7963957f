"""TensorRT engines on CUDA tensors (full TensorRT or TensorRT-RTX on a GPU machine).

EngineRunner is deliberately small, for parity and the GPU checks: shapes are set per call from the inputs,
outputs are allocated to the shapes TensorRT infers, and execution is enqueued on PyTorch's current stream.
BufferedEngineRunner serves a denoising loop from persistent buffers and CUDA graphs. Nothing here runs
without CUDA.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import ExecutionError, MissingComponent, UsageError
from ..trt import backend as backends
from ..trt.build import check_engine

log = logging.getLogger("toma_export")


class EngineRunner:
    def __init__(self, engine_json):
        self.meta = check_engine(engine_json)                 # version mismatches fail before deserializing
        _, self.trt = backends.load(self.meta["backend"])
        if self.meta["selection"].startswith("plugin"):
            import toma_export.plugins.trt_plugin  # noqa: F401  (the engine's plugin must be registered)
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        runtime = self.trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(Path(self.meta["engine"]).read_bytes())
        if self.engine is None:
            raise ExecutionError(f"could not deserialize {self.meta['engine']} on this GPU")
        self.context = self.engine.create_execution_context()
        self.outputs = [o["name"] for o in self.meta["outputs"]]

    def __call__(self, inputs: dict) -> dict:
        set_input_shapes(self.context, self.meta, {name: tuple(t.shape) for name, t in inputs.items()})
        trt = self.trt
        stream = torch.cuda.current_stream()
        keep = {}
        for name, tensor in inputs.items():
            t = tensor.cuda().contiguous()
            keep[name] = t
            self.context.set_tensor_address(name, t.data_ptr())
        out = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch_dtype(trt, torch, self.engine.get_tensor_dtype(name))
            out[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, out[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExecutionError("TensorRT execution failed")
        stream.synchronize()
        return out


class ShapeOutOfProfile(UsageError):
    """An input shape the engine's optimization profile does not cover."""


def set_input_shapes(context, meta: dict, shapes: dict) -> None:
    """context.set_input_shape for every input; a shape TensorRT refuses becomes one line naming the input,
    the shape, what the engine accepts and how to rebuild it (instead of a crash at the next enqueue)."""
    for name, shape in shapes.items():
        if context.set_input_shape(name, tuple(shape)):
            continue
        profile = (meta.get("profiles") or {}).get(name)
        recorded = next((i["shape"] for i in meta.get("inputs", []) if i["name"] == name), None)
        accepts = (f"its profile takes {tuple(profile['min'])} to {tuple(profile['max'])}" if profile else
                   f"it was built for exactly {tuple(recorded)}" if recorded is not None else
                   "the engine has no such input")
        raise ShapeOutOfProfile(f"{meta.get('engine', 'the engine')}: input {name} has shape {tuple(shape)}, but "
                                f"{accepts}; rebuild covering it: `toma-export build --model {meta.get('model')} "
                                "--min-size HxW --max-size HxW` (or --static at the size you serve)")


def torch_dtype(trt, torch, dtype):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}
    return table[dtype]


class BufferedEngineRunner:
    """An engine run from persistent device buffers, replayed as a CUDA graph when its shapes repeat.

    EngineRunner allocates outputs per call, which suits parity checks; a denoising loop calls the same
    shapes 20-50 times, so buffers are allocated and their addresses set once per input signature, inputs
    are copied in, and the enqueue is captured once per signature and replayed. The ToMA selection is a
    data-dependent select inside the graph, not host control flow, so one capture serves recompute and
    reuse steps alike."""

    def __init__(self, engine_json, cuda_graphs: bool = True):
        if not torch.cuda.is_available():
            raise MissingComponent("the tensorrt backend needs a CUDA GPU; use --backend onnxruntime (the CPU fallback)")
        self.runner = EngineRunner(engine_json)
        self.meta = self.runner.meta
        self.trt, self.engine, self.context = self.runner.trt, self.runner.engine, self.runner.context
        self.inputs = [i["name"] for i in self.meta["inputs"]]
        self.outputs = self.runner.outputs
        self.dtypes = {n: torch_dtype(self.trt, torch, self.engine.get_tensor_dtype(n))
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
