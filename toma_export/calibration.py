"""Calibrate 8-bit scales on the PyTorch reference with ToMA on, using NVIDIA's TensorRT Model Optimizer.

The diffusers pipeline runs the calibration prompts through the ToMA-patched network with modelopt's
quantizers inserted (`modelopt.torch.quantization`, fake quantization on any device), so the quantizers see
merged tokens, as the exported graph will. The recipes follow NVIDIA's diffusion examples: INT8 is
SmoothQuant on the Linear layers (alpha 0.8) with max calibration, and the 99.99th percentile of a histogram
for the convolutions' inputs; FP8 is E4M3 with max calibration, per tensor. The family's filter leaves out
the embeddings and first and last layers (`quant_skip`). The scales come out as a safetensors file under
the layers' buffer names (quantize.py), cached by everything that changes them, so an export reuses them.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import models
from .artifacts import cache_key, claimed, source_digest, staged_dir, versions, writable_dir
from .errors import MissingComponent, UsageError
from .quantize import DEFAULT_LEVEL, Quantization, check_mode, install, layers, scale_names
from .toma import ToMAConfig, apply_toma

SCALES = "scales.safetensors"
ALPHA = 0.8                 # SmoothQuant's migration strength in NVIDIA's SDXL INT8 recipe
PERCENTILE = 99.99          # the convolutions' input range (INT8)
DEFAULT_STEPS = 8
DEFAULT_PROMPTS = 8
# what real-size models calibrate on without --calib-prompts: varied scenes, one per line of a user's file
_GENERAL = ("a photo of a cat sitting on a windowsill in the morning sun",
            "a watercolor painting of a lighthouse on a cliff at dusk",
            "a close-up portrait of an old fisherman, dramatic lighting",
            "a futuristic city street at night with neon signs and rain",
            "a bowl of fresh fruit on a wooden table, studio photo",
            "a mountain lake surrounded by pine trees, aerial view",
            "an astronaut riding a horse on the moon, digital art",
            "a red vintage car parked in front of a brick wall")


@dataclass(frozen=True)
class CalibrationOptions:
    mode: str = "int8"
    level: str = DEFAULT_LEVEL
    prompts: str | None = None     # a file, one prompt per line; None: the built-in list
    steps: int = DEFAULT_STEPS     # denoising steps per prompt
    size: tuple | None = None      # (height, width) pixels; None: the model's default size
    seed: int = 0


def prompts(spec, file: str | None) -> list[str]:
    """The calibration prompts: the file's non-empty lines, else the shapes grammar (tiny models, every third
    caption) or a small general list."""
    if file is None:
        if spec.source is None:
            from .shapes import grammar

            return grammar()[::3][:DEFAULT_PROMPTS]
        return list(_GENERAL[:DEFAULT_PROMPTS])
    path = Path(file)
    if not path.is_file():
        raise UsageError(f"--calib-prompts {file}: no such file; give a text file with one prompt per line")
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"--calib-prompts {file} holds no prompt; write one prompt per line")
    return lines


def calibrate(model: str, config: ToMAConfig | None, options: CalibrationOptions, output_dir,
              progress=None, quiet: bool = False) -> Quantization:
    """The scales for `model` with ToMA `config` (reused when an identical calibration exists)."""
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check_mode(options.mode, options.level)
    if options.mode == "none":
        raise UsageError("calibrate needs --quantize int8 or fp8")
    if options.steps < 1:
        raise UsageError(f"--calib-steps must be >= 1, got {options.steps}")
    spec = models.get(model)
    texts = prompts(spec, options.prompts)
    size = spec.size(*(options.size or (None, None)))
    key = cache_key(dict(model=spec.name, base=spec.base_label(), fingerprint=spec.weights_fingerprint(),
                         toma=asdict(config) if config else None, mode=options.mode, level=options.level,
                         prompts=texts, steps=options.steps, size=size, seed=options.seed,
                         versions=dict(versions("nvidia-modelopt", "torch", "diffusers"), sources=source_digest())))
    final = writable_dir(output_dir) / f"{Path(spec.name).name}-{options.mode}-{key}"
    with claimed(final, progress):
        if not (final / SCALES).is_file():
            _run(spec, model, config, options, texts, size, final, progress, quiet)
        else:
            progress(f"[calibrate] reusing {final}")
    return Quantization(options.mode, options.level, str(final / SCALES), key)


def _run(spec, model, config, options, texts, size, final, progress, quiet) -> None:
    _modelopt()
    from tqdm.auto import tqdm

    from .serve.pipeline import load_pipeline

    t0 = time.perf_counter()
    pipe = load_pipeline(model, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if config is not None:
        apply_toma(pipe, config)
    net = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    chosen = layers(net, spec.quant_skip, options.level)
    if not chosen:
        raise UsageError(f"{spec.name} has no layer that level {options.level} quantizes (level 1.0 takes "
                         "convolutions only; FLUX has none): use --quant-level 3.0")
    convs = [n for n, c in chosen.items() if c == "conv"] if options.mode == "int8" else []
    passes = 2 if convs else 1
    progress(f"[calibrate] {spec.name} {options.mode} level {options.level}: {len(chosen)} layers, "
             f"{len(texts)} prompts x {options.steps} steps at {size[0]}x{size[1]} px"
             f"{', ToMA on' if config else ''}{f', {passes} passes' if passes > 1 else ''}")
    bar = tqdm(total=passes * len(texts), desc=f"calibrate {spec.name} {options.mode}", disable=quiet,
               dynamic_ncols=True)

    def loop(_network=None):
        for i, text in enumerate(texts):
            pipe(text, height=size[0], width=size[1], num_inference_steps=options.steps,
                 guidance_scale=spec.default_guidance, generator=torch.Generator().manual_seed(options.seed + i),
                 **spec.pipeline_kwargs())
            bar.update(1)

    with bar:
        scales = _modelopt_scales(net, chosen, options.mode, loop)
    meta = dict(mode=options.mode, level=options.level, model=spec.name, layers=str(len(chosen)),
                prompts=json.dumps(texts), steps=str(options.steps), size=f"{size[0]}x{size[1]}",
                toma=json.dumps(asdict(config) if config else None, default=str),
                seconds=f"{time.perf_counter() - t0:.1f}")
    from safetensors.torch import save_file

    with staged_dir(final) as tmp:
        save_file(scales, str(tmp / SCALES), metadata=meta)
        (tmp / "calibration.json").write_text(json.dumps(dict(meta, prompts=texts), indent=1))
    progress(f"[calibrate] wrote {final / SCALES} in {time.perf_counter() - t0:.0f} s")


def module_scales(net: torch.nn.Module, mode: str, loop, level: str = DEFAULT_LEVEL, skip: tuple = ()) -> dict:
    """The scales of `net`'s layers at `level` (leaving out names holding one of `skip`), calibrated by modelopt
    while `loop(net)` runs it: for a network without its pipeline. modelopt's quantizers stay in `net`."""
    _modelopt()
    check_mode(mode, level)
    chosen = layers(net, skip, level)
    if not chosen:
        raise UsageError(f"no layer of this network is quantized at level {level}")
    return _modelopt_scales(net, chosen, mode, lambda *_: loop(net))


def calibrate_module(net: torch.nn.Module, mode: str, loop, level: str = DEFAULT_LEVEL, skip: tuple = ()) -> dict:
    """`net` quantized in place (quantize.install) with scales calibrated on a copy (module_scales): a block
    in the benchmark. Returns the scales."""
    import copy

    scales = module_scales(copy.deepcopy(net), mode, loop, level, skip)
    names, smoothed = scale_names(scales)
    install(net, mode, names, smoothed)
    for key, value in scales.items():
        net.get_buffer(key).copy_(value.to(net.get_buffer(key).device))
    return scales


def _modelopt():
    try:
        with _quiet_modelopt():
            import modelopt.torch.quantization  # noqa: F401
    except ImportError as err:
        raise MissingComponent(f"quantizing needs NVIDIA's TensorRT Model Optimizer: pip install 'toma-export[quantize]' "
                               f"(nvidia-modelopt, core only) ({err})") from None


def _modelopt_scales(net, chosen: dict, mode: str, loop) -> dict:
    """modelopt's calibration of the `chosen` layers of `net` (modified in place) while `loop` runs: the
    recipe below, then the convolutions' inputs from a histogram (int8)."""
    import modelopt.torch.quantization as mtq

    convs = [n for n, c in chosen.items() if c == "conv"] if mode == "int8" else []
    with torch.no_grad(), _quiet_modelopt():
        mtq.quantize(net, _recipe(chosen, mode), loop)
        if convs:
            _percentile(net, convs, loop)
    return _scales(net, chosen, mode)


def _recipe(chosen: dict, mode: str) -> dict:
    """modelopt's config: every quantizer off, then the chosen layers' input and weight quantizers."""
    if mode == "int8":
        weight, act = dict(num_bits=8, axis=0), dict(num_bits=8, axis=None)
        algorithm = dict(method="smoothquant", alpha=ALPHA)
    else:
        weight = act = dict(num_bits=(4, 3), axis=None)
        algorithm = "max"
    entries = [dict(quantizer_name="*", enable=False)]
    for name in chosen:
        entries += [dict(quantizer_name=f"{name}.weight_quantizer", cfg=weight),
                    dict(quantizer_name=f"{name}.input_quantizer", cfg=act)]
    return dict(quant_cfg=entries, algorithm=algorithm)


def _percentile(net, names, loop) -> None:
    """Re-calibrate the named layers' input quantizers with modelopt's histogram calibrator."""
    from modelopt.torch.quantization.calib import HistogramCalibrator

    quantizers = [net.get_submodule(n).input_quantizer for n in names]
    for q in quantizers:
        q._calibrator = HistogramCalibrator(num_bits=8, axis=None, unsigned=False)
        q.disable_quant()
        q.enable_calib()
    loop()
    for q in quantizers:
        q.load_calib_amax("percentile", percentile=PERCENTILE)
        q.enable_quant()
        q.disable_calib()


def _scales(net, chosen: dict, mode: str) -> dict:
    """{<layer>.input_scale, .weight_scale, .input_smooth}: modelopt's ranges as ONNX scales (amax / qmax)."""
    qmax = 127.0 if mode == "int8" else 448.0
    out = {}
    for name in chosen:
        layer = net.get_submodule(name)
        iq, wq = layer.input_quantizer, layer.weight_quantizer
        out[f"{name}.input_scale"] = (iq.amax.float().reshape(()) / qmax).clamp_min(1e-12)
        w = wq.amax.float()
        out[f"{name}.weight_scale"] = (w.reshape(-1) if mode == "int8" else w.reshape(())) / qmax
        out[f"{name}.weight_scale"].clamp_(min=1e-12)
        pre = getattr(iq, "pre_quant_scale", None)
        if pre is not None:
            out[f"{name}.input_smooth"] = pre.float().reshape(-1)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


class _quiet_modelopt:
    """modelopt warns about untested transformers versions and prints its quantizer counts ("Inserted 446
    quantizers"): neither says anything to a user of this toolkit, whose own progress lines say what runs."""

    def __enter__(self):
        import contextlib
        import io
        import warnings

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        self._stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)
