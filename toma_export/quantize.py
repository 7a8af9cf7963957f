"""8-bit layers as the exported graph computes them: fake quantization in PyTorch, QuantizeLinear and
DequantizeLinear in ONNX, with the same scales.

A quantized Linear or Conv2d reads its input through Q/DQ at one per-tensor scale (after SmoothQuant's
per-channel `input_smooth`, folded into the weight as W / smooth) and its weight through Q/DQ at a
per-output-channel scale (int8) or one scale (fp8 E4M3). The scales are buffers named beside the weight
(`<layer>.input_scale`, `<layer>.weight_scale`, `<layer>.input_smooth`), so an export places them as data
like any weight, and the weights themselves stay the unquantized `state_dict` tensors: a swap or refit of
either needs no trace. Eager PyTorch rounds as ONNX does (half to even, int8 saturating at -128..127, E4M3
at +-448), so the fake-quantized network is the reference an export is held to. Nothing of ToMA (selection,
merge and unmerge weights) is a Linear, so it keeps the network's precision. `calibration` picks the scales.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UsageError

MODES = ("none", "int8", "fp8")
# demo/Diffusion's quantization levels: which layers are quantized
LEVELS = {"1.0": ("conv",), "2.0": ("conv", "ffn"), "2.5": ("conv", "ffn", "qkv"),
          "3.0": ("conv", "ffn", "qkv", "linear")}
DEFAULT_LEVEL = "3.0"
OPSET = 19                  # the first with float8 QuantizeLinear / DequantizeLinear
_QMAX = {"int8": 127.0, "fp8": 448.0}
_ONNX_TYPE = {"int8": 3, "fp8": 17}       # TensorProto INT8, FLOAT8E4M3FN
_TORCH_TYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_QKV = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
_FFN = (".ff.", ".ff_context.", "proj_mlp")


@dataclass(frozen=True)
class Quantization:
    """A calibrated quantization an export applies: the mode, the level, and the scales file (safetensors)
    with its digest, which keys the export's weights (the graph depends on mode, level and layers only)."""

    mode: str
    level: str
    scales: str
    digest: str

    def label(self) -> str:
        return f"{self.mode} level {self.level}"


def check_mode(mode: str, level: str = DEFAULT_LEVEL) -> None:
    if mode not in MODES:
        raise UsageError(f"--quantize must be one of {', '.join(MODES)}, got {mode!r}")
    if level == "4.0":
        raise UsageError("quantization level 4.0 (quantized attention) is not supported: ToMA's merged attention "
                         f"stays in the network's precision; use one of {', '.join(LEVELS)}")
    if level not in LEVELS:
        raise UsageError(f"--quant-level must be one of {', '.join(LEVELS)} (demo/Diffusion's levels), got {level!r}")


def check_opset(opset: int) -> None:
    if opset < OPSET:
        raise UsageError(f"a quantized export needs opset {OPSET} or later (float8 QuantizeLinear and its zero "
                         f"points); got --opset {opset}")


def refuse(mode: str | None, loras=(), cache=None) -> None:
    """What a quantized network does not combine with yet, refused before any calibration."""
    if mode in (None, "none"):
        return
    if cache is not None:
        raise UsageError("--quantize with --cache: First-Block Cache's head and tail are not quantized yet; pass "
                         "--cache none")
    if loras:
        raise UsageError("--quantize with --lora: the scales are calibrated on the weights without the LoRA; fuse "
                         "the LoRA into a diffusers folder first (pipe.fuse_lora(); save_pretrained) and quantize that")


def kind(name: str, module: torch.nn.Module) -> str | None:
    """The level category of a layer: conv, qkv, ffn or linear (None: not a quantizable layer)."""
    if isinstance(module, torch.nn.Conv2d):
        return "conv"
    if not isinstance(module, torch.nn.Linear):
        return None
    if name.rsplit(".", 1)[-1] in _QKV:
        return "qkv"
    if any(part in f".{name}" for part in _FFN):
        return "ffn"
    return "linear"


def layers(model: torch.nn.Module, skip: tuple, level: str) -> dict:
    """{layer name: category} of the Linear / Conv2d layers quantized at `level`, leaving out any whose name
    holds one of `skip` (the family's embeddings, first and last layers)."""
    wanted = LEVELS[level]
    out = {}
    for name, module in model.named_modules():
        category = kind(name, module)
        if category in wanted and not any(s in name for s in skip):
            out[name] = category
    return out


def qdq(x: torch.Tensor, scale: torch.Tensor, mode: str, axis: int | None = None) -> torch.Tensor:
    """Quantize then dequantize `x` at `scale` (per tensor, or per channel along `axis`): two ONNX nodes in an
    export, their exact arithmetic in eager PyTorch. Half-precision inputs go through fp32 (ONNX Runtime's CPU
    kernels take no bf16)."""
    wide = x.dtype not in (torch.float32, torch.float16)
    if wide:
        x = x.float()
    scale = scale.to(x.dtype)
    if torch.onnx.is_in_onnx_export():
        attrs = {} if axis is None else dict(axis=axis)
        q = torch.onnx.ops.symbolic("::QuantizeLinear", (x, scale), dict(attrs, output_dtype=_ONNX_TYPE[mode]),
                                    dtype=_TORCH_TYPE[mode], shape=x.shape, version=1).to(x.device)
        out = torch.onnx.ops.symbolic("::DequantizeLinear", (q, scale), attrs, dtype=x.dtype, shape=x.shape,
                                      version=1).to(x.device)     # made on the default device: meta traces need meta
    else:
        s = scale if axis is None else scale.reshape([-1] + [1] * (x.dim() - 1 - axis))
        y = x / s
        if mode == "int8":
            q = torch.round(y).clamp(-128, 127)
        else:
            q = y.clamp(-_QMAX["fp8"], _QMAX["fp8"]).to(torch.float8_e4m3fn).to(x.dtype)
        out = q * s
    return out.to(torch.bfloat16) if wide else out


class _Quantized:
    """What QuantLinear and QuantConv2d share: the scales as buffers and the quantized operands."""

    mode = "int8"              # set per layer by `install`
    off = False                # `disabled`: the unquantized layer

    def _scales(self, channels: int, smooth: bool) -> None:
        like = dict(device=self.weight.device, dtype=torch.float32)
        self.register_buffer("input_scale", torch.ones((), **like))
        self.register_buffer("weight_scale", torch.ones(channels if self.mode == "int8" else (), **like))
        self.register_buffer("input_smooth", torch.ones(self.weight.shape[1], **like) if smooth else None)

    def _operands(self, x: torch.Tensor, transposed: bool = False):
        """(x, W) through Q/DQ. `transposed`: a Linear's W as [in, out], so that the weight's DequantizeLinear
        feeds the MatMul directly (no Transpose between), the pattern ONNX Runtime fuses into an integer kernel."""
        weight = self.weight
        if self.off:
            return x, weight
        if self.input_smooth is not None:        # SmoothQuant: x / s times W * s, with s folded here
            smooth = self.input_smooth.to(x.dtype)
            x = x * smooth
            weight = weight / smooth.to(weight.dtype)
        axis = None if self.mode != "int8" else 1 if transposed else 0
        if transposed:
            weight = weight.t()
        return qdq(x, self.input_scale, self.mode), qdq(weight, self.weight_scale, self.mode, axis)


@contextlib.contextmanager
def disabled(model: torch.nn.Module):
    """The same network unquantized for a while (quantizing never changes its weights)."""
    quantized = [m for m in model.modules() if isinstance(m, _Quantized)]
    for m in quantized:
        m.off = True
    try:
        yield model
    finally:
        for m in quantized:
            m.off = False


class QuantLinear(_Quantized, torch.nn.Linear):
    def forward(self, x):
        if self.off:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        x, w = self._operands(x, transposed=True)
        y = torch.matmul(x, w)
        return y if self.bias is None else y + self.bias


class QuantConv2d(_Quantized, torch.nn.Conv2d):
    def forward(self, x):
        x, w = self._operands(x)
        return self._conv_forward(x, w, self.bias)


def install(model: torch.nn.Module, mode: str, names, smoothed=()) -> None:
    """Turn the named Linear / Conv2d layers of `model` into their quantized kind in place (scales at 1 until
    loaded; `smoothed` names the layers with a SmoothQuant factor). Works on the meta device."""
    smoothed = set(smoothed)
    for name in names:
        module = model.get_submodule(name)
        cls = QuantConv2d if isinstance(module, torch.nn.Conv2d) else QuantLinear
        module.__class__, module.mode = cls, mode
        module._scales(module.weight.shape[0], name in smoothed)


def scale_names(scales: dict) -> tuple[list, list]:
    """(quantized layer names, those with a SmoothQuant factor) from a scales dict's keys."""
    names = sorted({k.rsplit(".", 1)[0] for k in scales if k.endswith(".input_scale")})
    return names, sorted(k.rsplit(".", 1)[0] for k in scales if k.endswith(".input_smooth"))


def load_scales(path) -> tuple[dict, dict]:
    """(scales {key: fp32 tensor}, the file's metadata: mode, level, model)."""
    from safetensors import safe_open

    from .errors import ArtifactError

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: the calibration's scales are gone; calibrate again (drop the cached folder)")
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def apply(model: torch.nn.Module, quant: Quantization | None) -> torch.nn.Module:
    """The fake-quantized network: `quant`'s layers installed with its scales (any device; meta keeps meta)."""
    if quant is None:
        return model
    scales, _ = load_scales(quant.scales)
    names, smoothed = scale_names(scales)
    install(model, quant.mode, names, smoothed)
    if next(model.parameters()).device.type != "meta":
        for key, value in scales.items():
            model.get_buffer(key).copy_(value)
    return model


def switch(model: torch.nn.Module, quant: Quantization | None) -> None:
    """A network fake-quantized with `quant`'s scales, or (None) run unquantized: for runs that compare modes
    on one loaded network (quantizing never changes its weights)."""
    if quant is not None:
        apply(model, quant)
    for m in model.modules():
        if isinstance(m, _Quantized):
            m.off = quant is None


def with_scales(source, quant: Quantization | None):
    """A WeightSource (weightfiles) that also holds the scales, under their buffer names, so an export places
    them beside the weights."""
    if quant is None:
        return source
    from .weightfiles import WeightSource, tensor_bytes

    scales, _ = load_scales(quant.scales)
    shapes = dict(source.shapes(), **{k: tuple(v.shape) for k, v in scales.items()})

    def chunks(key: str, dtype: torch.dtype):
        if key in scales:
            yield tensor_bytes(scales[key].to(torch.float32))
        else:
            yield from source.chunks(key, dtype)

    return WeightSource(shapes, chunks, f"{source.describe}, {quant.label()} scales",
                        lambda key, dtype: None if key in scales else source.stored(key, dtype))
