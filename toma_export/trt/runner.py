"""Run a built engine on CUDA tensors (full TensorRT or TensorRT-RTX on a GPU machine).

Deliberately small: what the GPU checks and parity need. Shapes are set per call from the inputs, outputs
are allocated to the shapes TensorRT infers, and execution is enqueued on PyTorch's current stream.
"""
from __future__ import annotations

from pathlib import Path

from . import backend as backends
from ..errors import ExecutionError, UsageError
from .build import check_engine


class EngineRunner:
    def __init__(self, engine_json):
        import torch

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
        self.torch = torch
        self.outputs = [o["name"] for o in self.meta["outputs"]]

    def __call__(self, inputs: dict) -> dict:
        set_input_shapes(self.context, self.meta, {name: tuple(t.shape) for name, t in inputs.items()})
        torch, trt = self.torch, self.trt
        stream = torch.cuda.current_stream()
        keep = {}
        for name, tensor in inputs.items():
            t = tensor.cuda().contiguous()
            keep[name] = t
            self.context.set_tensor_address(name, t.data_ptr())
        out = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _torch_dtype(trt, torch, self.engine.get_tensor_dtype(name))
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


def _torch_dtype(trt, torch, dtype):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}
    return table[dtype]
