"""TensorRT plugin `toma::ToMASelect`, as a quickly deployable Python plugin (`tensorrt.plugin`).

Importing this module registers the plugin; it needs full TensorRT 10.9 or newer (the first with AOT Python
plugins). The ONNX parser maps our node to it by op_type and the node's `plugin_namespace` attribute, ahead
of the node's local function (10.7-10.14 prefer a registered plugin; 10.15+ do so for a node that carries
`plugin_namespace`), so the same ONNX file that ONNX Runtime runs through its body takes this plugin.
- aot_impl: the Triton kernel's PTX, compiled when the engine is built and embedded in it; the engine then
  runs without Python (trtexec, C++ servers, Triton Inference Server). `toma-export build` prefers it.
- impl: a Python callback launching the same kernel through PyTorch (JIT plugins).

The code follows NVIDIA's `tensorrt.plugin` sources (10.9 to 11.4), and tests/test_trt_plugin_contract.py
drives it through those packages:
- annotations must stay real classes (the decorators call issubclass on them): no `from __future__ import
  annotations` in this module;
- the parser passes INT/FLOAT attributes as one-element int32/float32 arrays; they are declared as arrays
  and unpacked here, because the 10.x packages turn a declared `int` into `int(array)`, which NumPy 2.4
  refuses;
- the AOT kernel receives (inputs, extra scalars, outputs); the recompute flag is an int32 tensor because
  plugin tensors cannot be BOOL.
Tile size and channels are static in exported graphs; batch and tile count may be dynamic and become the
launch grid.
"""
import contextlib
import os
from typing import Tuple, Union

import numpy as np
import numpy.typing as npt
import tensorrt as trt
import tensorrt.plugin as trtp

from . import ptx
from ..errors import UsageError
from .select_kernel import compile_ptx, launch

NAME = "toma::ToMASelect"
# dtype name and array-interface typestr of every dtype the plugin takes; bf16 has no typestr (NVIDIA's
# Tensor refuses it), so it travels as int16 and is viewed back by name
_DTYPES = {trt.float32: ("float32", "<f4"), trt.float16: ("float16", "<f2"), trt.bfloat16: ("bfloat16", "<i2"),
           trt.int32: ("int32", "<i4"), trt.int64: ("int64", "<i8")}
_target = {"capability": None, "ptx_version": None}


def configure(capability: int | None = None, ptx_version: int | None = None) -> None:
    """The GPU architecture (90 = sm_90) and PTX ISA (84 = 8.4) the AOT kernel is compiled for; unset, the
    building GPU's architecture and the version `ptx.choose` picks. `toma-export build` sets both."""
    _target.update(capability=capability, ptx_version=ptx_version)


def _scalar(value):
    """One attribute value from the one-element array the parser (or NVIDIA's package) hands over."""
    return np.asarray(value).reshape(-1)[0].item()


@trtp.register(NAME)
def select_desc(tiles: trtp.TensorDesc, previous: trtp.TensorDesc, recompute: trtp.TensorDesc,
                num_dst: npt.NDArray[np.int32], tie_tol: npt.NDArray[np.float32]) -> trtp.TensorDesc:
    """Destinations have the shape and dtype of the previous destinations: (B, T, num_dst)."""
    return previous.like()


@trtp.impl(NAME)
def select_impl(tiles: trtp.Tensor, previous: trtp.Tensor, recompute: trtp.Tensor, num_dst: npt.NDArray[np.int32],
                tie_tol: npt.NDArray[np.float32], outputs: Tuple[trtp.Tensor], stream: int) -> None:
    import torch

    device = _device()
    x, prev, flag, out = (_as_torch(t, device) for t in (tiles, previous, recompute, outputs[0]))
    b, t, n, c = x.shape
    k = _scalar(num_dst)
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)) if device == "cuda" else contextlib.nullcontext():
        launch(x.reshape(b * t, n, c), k, _scalar(tie_tol), previous=prev, recompute=flag,
               out=out.view(b * t, k))


@trtp.aot_impl(NAME)
def select_aot(tiles: trtp.TensorDesc, previous: trtp.TensorDesc, recompute: trtp.TensorDesc,
               num_dst: npt.NDArray[np.int32], tie_tol: npt.NDArray[np.float32], outputs: Tuple[trtp.TensorDesc],
               tactic: int) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
    n_expr, c_expr = tiles.shape_expr[2], tiles.shape_expr[3]
    if not (n_expr.is_constant and c_expr.is_constant):
        raise UsageError("toma::ToMASelect needs static tile size and channels (export with a fixed tile)")
    n, c = n_expr.constant_value(), c_expr.constant_value()
    capability = _target["capability"] or ptx.building_gpu()
    version = _target["ptx_version"] or ptx.choose(capability)[0]
    kernel = compile_ptx(_DTYPES[tiles.dtype][0], _DTYPES[previous.dtype][0], n, c, _scalar(num_dst), _scalar(tie_tol),
                         capability, version)
    params = trtp.KernelLaunchParams()
    params.grid_x = tiles.shape_expr[0] * tiles.shape_expr[1]          # one program per tile
    params.block_x = kernel.num_warps * 32
    params.shared_mem = kernel.shared
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(n), trtp.SymInt32(c)])    # the kernel's n and C
    return kernel.name, kernel.ptx, params, extra


def _device() -> str:
    """Plugin buffers are CUDA memory, except under the Triton interpreter (CPU tests), where they are host
    memory and the kernel runs on the CPU."""
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def array_interface(tensor: trtp.Tensor) -> dict:
    """The (CUDA) array interface of a plugin tensor, for every dtype the plugin takes, bf16 included."""
    typestr = _DTYPES[tensor.dtype][1]
    itemsize = int(typestr[-1])
    return {"shape": tuple(tensor.shape), "typestr": typestr, "data": (tensor.data_ptr, False),
            "strides": tuple(s * itemsize for s in tensor.strides), "version": 3}


def _as_torch(tensor: trtp.Tensor, device: str):
    import torch

    interface = array_interface(tensor)
    if device == "cuda":
        holder = type("CudaBuffer", (), {"__cuda_array_interface__": dict(interface, stream=None)})()
        out = torch.as_tensor(holder, device="cuda")
    else:
        holder = type("HostBuffer", (), {"__array_interface__": interface})()
        out = torch.from_numpy(np.asarray(holder))
    return out.view(getattr(torch, _DTYPES[tensor.dtype][0]))          # a no-op but for bf16
