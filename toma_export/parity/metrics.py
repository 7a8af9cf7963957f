"""How two outputs are compared, and when a comparison passes.

A candidate passes when it is finite and max|cand - ref| <= atol + rtol * max|ref|: tolerances are relative
to the output's scale, so they mean the same for a FLUX velocity and an SDXL noise prediction. The
reference is always the fp32 PyTorch ToMA model; defaults depend on the candidate's dtype and grow for a
whole loop, where errors compound over steps.
"""
from __future__ import annotations

import numpy as np
import torch

# (atol, rtol) per candidate dtype; "loop" compares final latents after N steps
TOLERANCES = {
    "step": {"fp32": (0.0, 1e-4), "fp16": (0.0, 2e-2), "bf16": (0.0, 5e-2)},
    "loop": {"fp32": (0.0, 1e-3), "fp16": (0.0, 5e-2), "bf16": (0.0, 1e-1)},
}
# An 8-bit graph against the fake-quantized reference with the same scales: the Q/DQ arithmetic is identical
# (tests/test_quantize.py), but a last-bit difference upstream moves a value across a rounding boundary now and
# then, which costs a whole int8 step or an E4M3 mantissa step (1/8) there, and later layers spread it. Measured
# on the tiny models at 128 px (docs/quantize.md), max error over the output's scale, per step: int8 1.5e-3
# (FLUX) and 6e-3 to 1.0e-2 (SDXL, by calibration), fp8 9e-3 (FLUX); after 4 steps int8 up to 2.9e-2, fp8
# 5.8e-2. The tolerances leave about twice that.
QUANT_RTOL = {"step": {"int8": 2e-2, "fp8": 3e-2}, "loop": {"int8": 5e-2, "fp8": 1e-1}}


def tolerance(kind: str, dtype: str | None, atol: float | None = None,
              rtol: float | None = None, quant: str | None = None) -> tuple[float, float]:
    a, r = TOLERANCES[kind][dtype or "fp32"]               # None: the candidate dtype was left at its default
    if quant:
        r = max(r, QUANT_RTOL[kind][quant])
    return (a if atol is None else atol), (r if rtol is None else rtol)


def compare(ref, cand, atol: float, rtol: float) -> dict:
    """Error statistics of cand against ref, and the verdict."""
    ref = np.asarray(ref, dtype=np.float64)
    cand = np.asarray(cand, dtype=np.float64).reshape(ref.shape)
    nan, inf = int(np.isnan(cand).sum()), int(np.isinf(cand).sum())
    err = np.abs(np.nan_to_num(cand, nan=np.inf) - ref).ravel()
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    limit = atol + rtol * scale
    finite = np.isfinite(err)
    a, b = ref.ravel(), np.nan_to_num(cand.ravel(), nan=0.0, posinf=0.0, neginf=0.0)
    cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    max_abs = float(err.max()) if err.size else 0.0
    return dict(max_abs=max_abs, median_abs=float(np.median(err)) if finite.all() else None,
                p99_abs=float(np.percentile(err, 99)) if finite.all() else None, cosine=cosine, scale=scale,
                nan=nan, inf=inf, atol=atol, rtol=rtol, tolerance=limit,
                passed=bool(nan == 0 and inf == 0 and max_abs <= limit))


def facility_value(tiles: torch.Tensor, dst: torch.Tensor) -> float:
    """Facility-location objective sum_u max_{s in D} cos(u, s), summed over tiles; tiles (B,T,n,C), dst (B,T,d)."""
    xn = torch.nn.functional.normalize(tiles.float(), dim=-1)
    picked = xn.gather(2, dst.long().unsqueeze(-1).expand(-1, -1, -1, xn.shape[-1]))
    return float((picked @ xn.transpose(-1, -2)).max(dim=2).values.sum())


def selection_agreement(tiles: torch.Tensor, ref_dst, cand_dst) -> dict:
    """Share of identical picks (as sets per tile) and the candidate's objective relative to the reference's:
    near-ties may change picks without changing the objective, which is what a bug would change."""
    ref_dst, cand_dst = torch.as_tensor(np.asarray(ref_dst)), torch.as_tensor(np.asarray(cand_dst))
    b, t = tiles.shape[:2]
    r, c = ref_dst.reshape(b, t, -1), cand_dst.reshape(b, t, -1)
    same = (r.sort(-1).values == c.sort(-1).values).float().mean().item()
    return dict(identical=same, objective_ratio=facility_value(tiles, c) / facility_value(tiles, r))
