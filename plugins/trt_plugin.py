"""TensorRT plugin `toma::ToMASelect`, as a TensorRT quickly deployable Python plugin (TensorRT 10.7+).

Importing this module registers the plugin. The ONNX parser maps a node to it by op_type and the
`plugin_namespace`/`plugin_version` attributes, so the same ONNX file that ONNX Runtime runs through its
local function takes this plugin when it is registered. Two implementations of the Triton kernel:
- aot_impl: PTX compiled ahead of time and embedded in the engine, which then runs without Python
  (trtexec, C++ servers, Triton Inference Server); picked when the network prefers AOT plugins.
- impl: a Python callback launching the same kernel through PyTorch, for JIT use.
Tile size and channels are static in exported graphs (the tile fold uses the constant tile shape);
batch and tile count may be dynamic and become the launch grid.
"""
from __future__ import annotations

from typing import Tuple, Union

import tensorrt as trt
import tensorrt.plugin as trtp

from .select_kernel import compile_ptx, launch

NAME = "toma::ToMASelect"
_DTYPES = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16", trt.int32: "int32",
           trt.int64: "int64"}


@trtp.register(NAME)
def select_desc(tiles: trtp.TensorDesc, previous: trtp.TensorDesc, recompute: trtp.TensorDesc, num_dst: int,
                tie_tol: float) -> trtp.TensorDesc:
    """Destinations have the shape and dtype of the previous destinations: (B, T, num_dst)."""
    return previous.like()


@trtp.impl(NAME)
def select_impl(tiles: trtp.Tensor, previous: trtp.Tensor, recompute: trtp.Tensor, num_dst: int, tie_tol: float,
                outputs: Tuple[trtp.Tensor], stream: int) -> None:
    import torch

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        x = torch.as_tensor(tiles, device="cuda")
        b, t, n, c = x.shape
        out = torch.as_tensor(outputs[0], device="cuda").reshape(b * t, num_dst)
        launch(x.reshape(b * t, n, c), num_dst, tie_tol, previous=torch.as_tensor(previous, device="cuda"),
               recompute=torch.as_tensor(recompute, device="cuda"), out=out)


@trtp.aot_impl(NAME)
def select_aot(tiles: trtp.TensorDesc, previous: trtp.TensorDesc, recompute: trtp.TensorDesc, num_dst: int,
               tie_tol: float, outputs: Tuple[trtp.TensorDesc], tactic: int
               ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
    n_expr, c_expr = tiles.shape_expr[2], tiles.shape_expr[3]
    if not (n_expr.is_constant and c_expr.is_constant):
        raise ValueError("toma::ToMASelect needs static tile size and channels (export with a fixed tile)")
    n, c = n_expr.constant_value, c_expr.constant_value
    kernel = compile_ptx(_DTYPES[tiles.dtype], _DTYPES[previous.dtype], n, c, num_dst, tie_tol, _capability())
    params = trtp.KernelLaunchParams()
    params.grid_x = tiles.shape_expr[0] * tiles.shape_expr[1]          # one program per tile
    params.block_x = kernel.metadata.num_warps * 32
    params.shared_mem = kernel.metadata.shared
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(n), trtp.SymInt32(c)])
    return kernel.metadata.name.encode(), kernel.asm["ptx"].encode(), params, extra


def _capability() -> int:
    """The building GPU's compute capability as Triton wants it (90 for sm_90)."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor
