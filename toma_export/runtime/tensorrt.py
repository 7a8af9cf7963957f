"""TensorRT engines on CUDA tensors (full TensorRT or TensorRT-RTX on a GPU machine).

EngineRunner is deliberately small, for parity and the GPU checks: shapes are set per call from the inputs,
outputs are allocated to the shapes TensorRT infers, and execution is enqueued on PyTorch's current stream.
BufferedEngineRunner serves a denoising loop from persistent buffers and CUDA graphs. Nothing here runs
without CUDA.

A weightless engine (`build --weightless`) is refitted right after it is deserialised, with every weight of the
ONNX export its engine.json names, through TensorRT's ONNX parser refitter. It is done in full at every load,
never with only the weights that changed since a previous one, so what runs is always exactly that export.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..artifacts import Artifact
from ..errors import ArtifactError, ExecutionError, MissingComponent, UsageError
from ..trt import backend as backends
from ..trt.build import check_engine, graph_key

log = logging.getLogger("toma_export")


class EngineRunner:
    def __init__(self, engine_json):
        self.meta = check_engine(engine_json)                 # version mismatches fail before deserializing
        _, self.trt = backends.load(self.meta["backend"])
        if self.meta["selection"].startswith("plugin"):
            import toma_export.plugins.trt_plugin  # noqa: F401  (the engine's plugin must be registered)
        folder = Artifact.load(engine_json, "engine").path.parent    # the plan beside it: a moved folder works
        weights = weights_source(self.meta, folder) if self.meta.get("weightless") else None    # before the GPU
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        runtime = self.trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine((folder / "engine.plan").read_bytes())
        if self.engine is None:
            raise ExecutionError(f"could not deserialize {self.meta['engine']} on this GPU")
        if weights is not None:
            refit(self.trt, self.engine, self.meta, weights, self.logger)
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


def weights_source(meta: dict, folder: Path | None = None) -> Path:
    """The ONNX export a weightless engine is refitted from, checked before anything touches the GPU: it is there
    with its weights file, and has the plan's graph (`refit`) or exactly the weights it was built with
    (`identical`: REFIT_IDENTICAL takes no others). A relative `weights` is taken from the engine's `folder`, so a
    copy that carries its export along (a serving repository) can name it."""
    path = Path(meta["weights"])
    if folder is not None and not path.is_absolute():
        path = folder / path
    again = (f"export it again (`toma-export build --model {meta['model']} --weightless {meta['weightless']}` "
             "exports it and reuses the plan)")

    def refuse(why: str):
        return ArtifactError(f"{meta['engine']} is a weightless plan refitted at load from {path}, but {why}; {again}")

    if not path.is_file():
        raise refuse("that export is gone")
    try:
        export = Artifact.load(path, "onnx").meta
    except ArtifactError as err:
        raise refuse(f"that export cannot be read ({err})") from None
    recorded = export.get("weights") or {}
    for name in recorded.get("files") or [recorded.get("file") or path.name + ".data"]:
        if export.get("external_data") and not path.with_name(name).is_file():
            raise refuse(f"its weights file {name} is gone")
    if meta["weightless"] == "identical" and export["key"] != meta["onnx_key"]:
        raise refuse(f"it holds other weights (export {export['key']}) than the plan was built with "
                     f"({meta['onnx_key']}), and --weightless identical takes no others")
    if graph_key(export) != meta["graph_key"]:
        raise refuse(f"it was exported for another graph ({graph_key(export)}, the plan's is {meta['graph_key']})")
    return path


def refit(trt, engine, meta: dict, weights: Path, logger) -> None:
    """Every weight of `weights` (an ONNX file whose initializers are named by state_dict key) into the deserialised
    engine, then the refit itself. A new Refitter each time: nothing from an earlier refit carries over."""
    t0 = time.perf_counter()
    if not engine.refittable:
        raise ArtifactError(f"{meta['engine']} is recorded as weightless but its plan is not refittable; rebuild it: "
                            f"`toma-export build --model {meta['model']} --weightless {meta['weightless']} --force`")
    refitter = trt.Refitter(engine, logger)
    parser = trt.OnnxParserRefitter(refitter, logger)
    parsed = parser.refit_from_file(str(weights))
    missing = refitter.get_missing_weights()
    if missing:
        raise ExecutionError(f"{weights} lacks {len(missing)} weights that {meta['engine']} needs "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); export it again")
    if not parsed:
        errors = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 3)))
        raise ExecutionError(f"could not refit {meta['engine']} from {weights}: {errors or 'see the log above'}; "
                             f"rebuild it with `toma-export build --model {meta['model']} --weightless "
                             f"{meta['weightless']} --force`")
    if not refitter.refit_cuda_engine():
        raise ExecutionError(f"TensorRT could not refit {meta['engine']} with the weights of {weights} (see the log "
                             "above)")
    log.info("refitted %d weights of %s from %s in %.1f s", len(refitter.get_all_weights()), meta["engine"], weights,
             time.perf_counter() - t0)


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
