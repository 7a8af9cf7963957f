"""What several commands share: value parsers, the ToMA options (every ToMAConfig field), keeping native
libraries' stdout off the --json object, and the peak memory every command reports."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

MODEL_HELP = "flux, sdxl, flux-tiny, sdxl-tiny or a local diffusers folder"


def size(text: str) -> tuple[int, int]:
    """'1024x768' -> (height=1024, width=768)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"size must look like HEIGHTxWIDTH in pixels, e.g. 1024x768, got {text!r}")
    return int(parts[0]), int(parts[1])


def sizes(text: str) -> tuple:
    return tuple(size(part) for part in text.split(","))


def tile(text: str) -> tuple[int, int]:
    """'4x8' -> (4, 8); '4' -> (4, 4)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"tile must look like ROWSxCOLS in tokens, e.g. 4x4, got {text!r}")
    return int(parts[0]), int(parts[-1])


def merge_steps(text: str):
    """'3' -> every 3rd step; '0,1,4' -> those steps."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"merge steps must be a period (3) or a list of steps (0,2,5), got {text!r}")
    return int(parts[0]) if len(parts) == 1 and "," not in text else [int(p) for p in parts]


def names(text: str) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b')."""
    items = tuple(p.strip() for p in text.split(",") if p.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma list, got {text!r}")
    return items


# ToMAConfig field -> (flag, parser, help); the default shown in the help is ToMAConfig's unless a command
# says otherwise (build: the recipe's)
TOMA_FIELDS = {
    "ratio": ("--ratio", float, "share of image tokens merged away, in [0, 1) (0.5)"),
    "tile": ("--tile", tile, "tile shape in tokens, ROWSxCOLS (4x4)"),
    "scale": ("--scale", float, "merge softmax sharpness on cosines (1000)"),
    "blocks": ("--blocks", names, "comma list of fnmatch patterns on block names, e.g. 'single_transformer_blocks.*' "
                                  "(the model's default)"),
    "levels": ("--levels", int, "UNet: transformer resolution levels to merge, highest first (1)"),
    "sublayers": ("--sublayers", names, "comma list of sub-layers run on merged tokens, from attn, cross_attn, mlp "
                                        "(all)"),
    "merge_steps": ("--merge-steps", merge_steps, "steps that merge: a period k (0, k, 2k...) or a list 0,2,5 "
                                                  "(all); the others run without ToMA"),
    "dst_every": ("--dst-every", int, "recompute destinations every n-th merged step (1)"),
    "weights_every": ("--weights-every", int, "recompute merge weights every n-th merged step (1)"),
}
SCHEDULE = ("merge_steps", "dst_every", "weights_every")


def add_toma_options(p: argparse.ArgumentParser, defaults: str = "") -> None:
    """One option per ToMAConfig field; `defaults` names where unset values come from instead."""
    group = p.add_argument_group("ToMA" + (f" (defaults: the {defaults})" if defaults else ""))
    for name, (flag, parse, text) in TOMA_FIELDS.items():
        group.add_argument(flag, dest=name, type=parse, help=text)


def toma_options(args) -> dict:
    """The ToMA fields given on the command line."""
    return {name: getattr(args, name) for name in TOMA_FIELDS if getattr(args, name, None) is not None}


def toma_config(args, base: dict | None = None):
    """ToMAConfig from the command line, falling back to `base` (a recipe's toma section), then defaults."""
    from ..toma import ToMAConfig

    return ToMAConfig(**{**(base or {}), **toma_options(args)})    # ToMAConfig normalises lists itself


def cache(text: str):
    """'none' -> None, 'fbcache:0.1' -> CacheConfig(0.1)."""
    from ..cache import parse
    from ..errors import UsageError

    try:
        return parse(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def caches(text: str) -> tuple:
    """'none,fbcache:0.1' -> (None, CacheConfig(0.1))."""
    return tuple(cache(part) for part in names(text))


def add_cache(p: argparse.ArgumentParser, many: bool = False) -> None:
    what = "comma list of step caches, each " if many else ""
    p.add_argument("--cache", type=caches if many else cache, default=(None,) if many else None,
                   help=f"{what}none or fbcache:THRESHOLD: First-Block Cache (FLUX) runs the first block every step "
                        "and reuses the rest of the network while its output changes by less than THRESHOLD, in "
                        "(0, 1), relative (diffusers' rule; 0.05-0.2 are usual) (none)")


def add_lora(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", type=lora_file, default=[], metavar="FILE[:SCALE]",
                   help="a LoRA (diffusers, peft or kohya .safetensors) fused into the weights at SCALE (1); "
                        "repeatable. The traced graph is reused: only the weights are written again")


def add_controlnet(p: argparse.ArgumentParser, images: bool = False) -> None:
    group = p.add_argument_group("ControlNet (docs/controlnet.md)")
    group.add_argument("--controlnet", action="append", type=controlnet, default=[], metavar="NAME|FOLDER[:SCALE]",
                       help="a ControlNet (sdxl-tiny-controlnet, flux-tiny-controlnet, a ControlNetModel or "
                            "FluxControlNetModel folder) at conditioning SCALE (1); repeatable: their residuals are "
                            "summed. Each exports as its own graph; the network's graph takes the residuals")
    group.add_argument("--controlnet-unmerged", action="store_true",
                       help="leave the ControlNets' own blocks without ToMA (default: merged as the network's are)")
    if images:
        group.add_argument("--control-image", action="append", default=[], metavar="FILE",
                           help="the control image of each --controlnet, in order (PNG or JPEG)")
        add_control_mode(group)


def add_control_mode(group) -> None:
    group.add_argument("--control-mode", action="append", default=[], metavar="MODE",
                       help="a Union ControlNet's mode (canny, tile, depth, blur, pose, gray, lq, as InstantX's "
                            "Union orders them, or a number): once per --controlnet, in order, 'none' for one "
                            "that is not a Union")


def controlnet(text: str) -> tuple[str, float]:
    """'NAME[:SCALE]' -> (name, scale); a folder path may hold colons of its own, so only a numeric tail is a scale."""
    name, sep, tail = text.rpartition(":")
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        if not name:
            raise argparse.ArgumentTypeError(f"--controlnet needs a name or folder before :SCALE, got {text!r}")
        return name, scale
    return text, 1.0


def lora_file(text: str):
    from ..lora import LoRAError, parse

    try:
        return parse(text)
    except LoRAError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def quant_modes(text: str) -> tuple:
    """--quantize none,int8,fp8 (sweep, bench): a comma list of 8-bit modes."""
    modes = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in modes if m not in ("none", "int8", "fp8")]
    if not modes or bad:
        raise argparse.ArgumentTypeError(f"modes are none, int8 and fp8, comma-separated; got {text!r}")
    return modes


def add_quantize(p: argparse.ArgumentParser, many: bool = False) -> None:
    group = p.add_argument_group("8-bit (docs/quantize.md)")
    if many:
        group.add_argument("--quantize", type=quant_modes, default=("none",), metavar="MODES",
                           help="comma list of none, int8, fp8: each ratio runs in each mode, calibrated with ToMA "
                                "at that ratio (none)")
    else:
        group.add_argument("--quantize", choices=["none", "int8", "fp8"], default="none",
                           help="quantize the network's Linear and Conv2d layers to int8 (SmoothQuant) or fp8 "
                                "(E4M3), calibrated on the PyTorch model with ToMA on; ToMA itself stays in the "
                                "network's precision (none)")
    group.add_argument("--quant-level", default="3.0", metavar="LEVEL",
                       help="which layers, as demo/Diffusion names them: 1.0 convolutions, 2.0 + feed-forward, "
                            "2.5 + q/k/v, 3.0 + every other Linear (3.0)")
    group.add_argument("--calib-prompts", metavar="FILE",
                       help="calibration prompts, one per line (default: 8 built-in; the shapes captions for "
                            "the tiny models)")
    group.add_argument("--calib-steps", type=int, default=8, metavar="N", help="denoising steps per prompt (8)")


def quantization(args, model: str, config):
    """The calibrated quantization `args` ask for (calibrated now, or reused), or None for --quantize none;
    what it cannot combine with (--lora, --cache, an old opset) is refused first."""
    from pathlib import Path

    from ..quantize import check_mode, check_opset, refuse

    check_mode(args.quantize, args.quant_level)
    refuse(args.quantize, getattr(args, "lora", ()), getattr(args, "cache", None))
    if args.quantize == "none":
        return None
    if getattr(args, "opset", None) is not None:
        check_opset(args.opset)
    from ..calibration import CalibrationOptions, calibrate
    from ..resources import default_output

    options = CalibrationOptions(mode=args.quantize, level=args.quant_level, prompts=args.calib_prompts,
                                 steps=args.calib_steps)
    return calibrate(model, config, options, Path(args.output_dir or default_output()) / "calib", progress=progress)


def check_file_quantize(artifact, wanted: str | None, fix: str) -> None:
    """Refuse an --onnx/--engine file that was not made in the 8-bit mode `wanted` (None: no mode asked for),
    before any work; `fix` ends the message."""
    made = (artifact.meta.get("quantize") or {}).get("mode", "none")
    if wanted not in (None, made):
        from ..errors import UsageError

        raise UsageError(f"{artifact.path} is {'not quantized' if made == 'none' else made}, not {wanted}: {fix}")


def add_json(p: argparse.ArgumentParser, instead: str = "the summary") -> None:
    p.add_argument("--json", action="store_true", help=f"print one JSON object instead of {instead}")


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def stdout_on_stderr():
    """Native libraries (TensorRT's logger) write to file descriptor 1: point it at stderr while they run, so
    stdout carries only our own output (the --json object)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def peak_memory() -> dict:
    """Peak resident memory so far, in GB (10^9 bytes): this process's, and separately the largest of its
    finished child processes' (build's export), so that users can size the machine a command needs."""
    import resource

    scale = 1 if sys.platform == "darwin" else 1024          # ru_maxrss: bytes on macOS, KiB on Linux
    gb = lambda who: round(resource.getrusage(who).ru_maxrss * scale / 1e9, 3)  # noqa: E731
    return dict(peak_rss_gb=gb(resource.RUSAGE_SELF), peak_rss_children_gb=gb(resource.RUSAGE_CHILDREN))


def peak_memory_line(peak: dict) -> str:
    children = f" (child processes {peak['peak_rss_children_gb']:.2f} GB)" if peak["peak_rss_children_gb"] else ""
    return f"peak memory {peak['peak_rss_gb']:.2f} GB{children}"
