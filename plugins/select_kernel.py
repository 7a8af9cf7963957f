"""Triton kernel for `toma::ToMASelect`: greedy facility location, one program per tile.

One source serves three uses: the PyTorch GPU fast path (`facility_location(..., impl="triton")`), CPU
tests under TRITON_INTERPRET=1, and the PTX that the TensorRT plugin embeds in engines (plugins/trt_plugin.py).
It mirrors toma_export.toma.selection: fp32 cosine similarity (IEEE, no TF32), first pick by row sum,
then exact marginal gains with picked tokens masked, ties within TIE_TOL to the lowest index; no FMA
contraction (enable_fp_fusion=False), so sums round as in the reference. The tile's
n x n similarity lives in registers; the d greedy steps are unrolled (d is a compile-time constant).
When the recompute flag (int32: TensorRT plugins take no bool tensors) is 0 the previous destinations are
copied and nothing is computed.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from ..errors import UsageError


@triton.jit
def select_kernel(x_ptr, prev_ptr, flag_ptr, n, C, out_ptr,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, TIE_TOL: tl.constexpr):
    """x: (P, n, C) contiguous features of P tiles; prev/out: (P, D) indices; flag: one int32 (0 = reuse).
    Argument order is TensorRT's for AOT plugins: inputs, scalar arguments, outputs."""
    tile = tl.program_id(0).to(tl.int64)
    out_row = out_ptr + tile * D
    if tl.load(flag_ptr) == 0:
        for i in tl.static_range(D):
            tl.store(out_row + i, tl.load(prev_ptr + tile * D + i).to(out_ptr.dtype.element_ty))
        return
    rows = tl.arange(0, BLOCK_N)
    valid = rows < n
    sim = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(x_ptr + tile * n * C + rows[:, None] * C + cols[None, :],
                    mask=valid[:, None] & (cols[None, :] < C), other=0.0).to(tl.float32)
        sim += tl.dot(x, tl.trans(x), input_precision="ieee")
        sq += tl.sum(x * x, axis=1)
    inv = 1.0 / tl.maximum(tl.sqrt(sq), 1e-12)
    sim = sim * inv[:, None] * inv[None, :]
    sim = tl.where(valid[None, :], sim, 0.0)                 # padded columns count for nothing

    picked = rows < 0
    cover = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in tl.static_range(D):
        if i == 0:
            score = tl.sum(sim, axis=1)
        else:
            score = tl.sum(tl.where(valid[None, :], tl.maximum(sim - cover[None, :], 0.0), 0.0), axis=1)
        score = tl.where(valid & (picked == 0), score, float("-inf"))
        near = score >= tl.max(score, axis=0) - TIE_TOL
        idx = tl.argmax(near.to(tl.float32), axis=0)         # first maximum: the lowest near-best index
        tl.store(out_row + i, idx.to(out_ptr.dtype.element_ty))
        hot = rows == idx
        picked = picked | hot
        row = tl.sum(tl.where(hot[:, None], sim, 0.0), axis=0)
        cover = row if i == 0 else tl.maximum(cover, row)


SHARED_LIMIT = 48 * 1024   # dynamic shared memory a kernel gets without cuFuncSetAttribute, as TensorRT launches it
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def block_sizes(n: int, c: int, feature_dtype: str = "float32") -> tuple[int, int]:
    """Register tile sizes: tl.dot needs at least 16 on each side, and its two staged operands
    (2 x BLOCK_N x BLOCK_C features) must fit the 48 KiB default shared memory, so a 128-token fp32 tile
    streams its channels in 32-wide chunks instead of 64."""
    block_n = max(16, triton.next_power_of_2(n))
    block_c = max(16, min(64, triton.next_power_of_2(c)))
    while block_c > 16 and 2 * block_n * block_c * ITEMSIZE[feature_dtype] > SHARED_LIMIT - 1024:
        block_c //= 2
    return block_n, block_c


def launch(x, k: int, tie_tol: float, previous=None, recompute=True, out=None):
    """Run the kernel on (P, n, C) features; returns (P, k) indices (int64 unless `out` says otherwise).

    `recompute` may be a bool or a tensor (the graph's int32 flag); with it 0, `previous` is copied.
    """
    import torch

    p, n, c = x.shape
    x = x.contiguous()
    out = torch.empty(p, k, dtype=torch.int64, device=x.device) if out is None else out
    previous = out if previous is None else previous.reshape(p, k).contiguous()
    flag = torch.as_tensor(recompute, device=x.device).reshape(-1)[:1].to(torch.int32)
    block_n, block_c = block_sizes(n, c, str(x.dtype).removeprefix("torch."))
    select_kernel[(p,)](x, previous, flag, n, c, out, D=k, BLOCK_N=block_n, BLOCK_C=block_c, TIE_TOL=tie_tol,
                        enable_fp_fusion=False)
    return out


TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int32": "i32", "int64": "i64"}


class KernelUnfit(UsageError):
    """The compiled kernel cannot be launched the way TensorRT launches AOT plugin kernels."""


@dataclass(frozen=True)
class AotKernel:
    name: str
    ptx: str
    num_warps: int
    shared: int          # bytes of dynamic shared memory per program
    ptx_version: int


def compile_ptx(feature_dtype: str, index_dtype: str, n: int, c: int, num_dst: int, tie_tol: float,
                capability: int = 90, ptx_version: int = 84) -> AotKernel:
    """Compile the kernel ahead of time for one GPU architecture and PTX ISA version (84 = 8.4). Needs no
    GPU, which is how the plugin's AOT path is tested on CPU.

    TensorRT launches the kernel with (inputs, scalar extras, outputs) = 6 arguments and pads the PTX entry's
    further parameters (Triton's global and profile scratch pointers) with null, on one CTA per program,
    without a cooperative or programmatic-dependent launch, and with at most 48 KiB of shared memory. Each of
    those is checked here, so a kernel that would misbehave in an engine fails the build instead."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    block_n, block_c = block_sizes(n, c, feature_dtype)
    f, i = TRITON_TYPES[feature_dtype], TRITON_TYPES[index_dtype]
    signature = {"x_ptr": f"*{f}", "prev_ptr": f"*{i}", "flag_ptr": "*i32", "n": "i32", "C": "i32",
                 "out_ptr": f"*{i}", "D": "constexpr", "BLOCK_N": "constexpr", "BLOCK_C": "constexpr",
                 "TIE_TOL": "constexpr"}
    constexprs = {"D": num_dst, "BLOCK_N": block_n, "BLOCK_C": block_c, "TIE_TOL": tie_tol}
    source = ASTSource(fn=select_kernel, signature=signature, constexprs=constexprs)
    kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                            options={"enable_fp_fusion": False, "ptx_version": ptx_version})
    meta = kernel.metadata
    where = f"toma::ToMASelect kernel ({n}-token tiles, {c} {feature_dtype} channels, sm_{capability})"
    if meta.shared > SHARED_LIMIT:
        raise KernelUnfit(f"the {where} needs {meta.shared} bytes of shared memory, over the 48 KiB TensorRT "
                          "launches plugin kernels with; use smaller tiles (--tile) or --selection body")
    unsafe = {"global scratch bytes": getattr(meta, "global_scratch_size", 0),    # older Tritons lack some
              "profile scratch bytes": getattr(meta, "profile_scratch_size", 0),
              "extra CTAs per program": getattr(meta, "num_ctas", 1) - 1,
              "cooperative launch": getattr(meta, "launch_cooperative_grid", False),
              "programmatic dependent launch": getattr(meta, "launch_pdl", False)}
    unsafe = {k: v for k, v in unsafe.items() if v}
    if unsafe:
        raise KernelUnfit(f"the {where} needs {unsafe}, which TensorRT's AOT launch does not provide; "
                          "use --selection body")
    return AotKernel(meta.name, kernel.asm["ptx"], meta.num_warps, meta.shared, ptx_version)
