"""LoRAs as weights: `--lora FILE[:SCALE]` is read with diffusers' own converters and fused into the export's
weights as they stream, so a LoRA changes the weights file and never the graph.

Every fused weight is W' = W + sum(scale * alpha / rank * up @ down), computed in fp32 from the base weight
each time (never from an earlier fusion), so switching LoRA A -> B -> A gives A's weights back bit for bit.
diffusers' `lora_state_dict` turns kohya, XLabs and other formats into diffusers/peft keys; alpha comes from
the file's adapter metadata, else its alpha tensors, else it equals the rank (diffusers' own rule).
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import logging
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UsageError
from .weightfiles import WeightSource, safetensors_header, tensor_bytes

# substrings of a LoRA's keys (in any supported format) that only one family's networks have
_MARKERS = {"flux": ("double_blocks", "single_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                     "img_attn", "txt_attn"),
            "sdxl": ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block")}
_LABEL = {"flux": "FLUX", "sdxl": "SDXL"}
_PREFIX = {"flux": "transformer.", "sdxl": "unet."}


class LoRAError(UsageError):
    """A LoRA that cannot be fused into this network."""


@dataclass(frozen=True)
class LoRA:
    path: str
    scale: float = 1.0

    def digest(self) -> str:
        """sha256 of the file: the weights key holds it, so an edited LoRA file is fused again."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as fh:
            for piece in iter(lambda: fh.read(1 << 24), b""):
                digest.update(piece)
        return digest.hexdigest()

    def describe(self) -> str:
        return f"{Path(self.path).name}:{self.scale:g}"


def parse(text: str) -> LoRA:
    """`FILE[:SCALE]` (argparse type): the file must exist; the scale defaults to 1."""
    path, sep, tail = text.rpartition(":")
    scale = 1.0
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            path = text                     # a ':' inside the file name
    path = path or text
    if not Path(path).expanduser().is_file():
        raise LoRAError(f"--lora {text}: {path} is not a file; pass a LoRA .safetensors file, optionally with "
                        ":SCALE (e.g. style.safetensors:0.8)")
    if not math.isfinite(scale):
        raise LoRAError(f"--lora {text}: the scale must be a finite number")
    return LoRA(str(Path(path).expanduser().resolve()), scale)


def as_options(loras) -> tuple:
    """LoRAs as the plain (path, scale) tuples that export options and artifact keys hold."""
    return tuple((lora.path, lora.scale) if isinstance(lora, LoRA) else tuple(lora) for lora in loras or ())


def terms(loras, family: str, shapes: dict, model: str, progress=None) -> dict:
    """{weight key: [(down, up, factor), ...]} for every weight the LoRAs change; factor is scale * alpha / rank.
    Refuses, in one line, a LoRA for another family, one whose modules match no weight, and a shape that
    does not fit."""
    out: dict = collections.defaultdict(list)
    for path, scale in as_options(loras):
        for module, (down, up, alpha) in _modules(path, family, model, progress).items():
            key = f"{module}.weight"
            if key not in shapes:
                raise LoRAError(f"LoRA {Path(path).name}: its module {module} matches no weight of {model}; "
                                f"pass a LoRA trained for this model's architecture")
            rank = down.shape[0]
            shape = tuple(shapes[key])
            delta = (up.shape[0], *down.shape[1:])
            if delta != shape or any(n != 1 for n in up.shape[2:]):
                raise LoRAError(f"LoRA {Path(path).name}: {module} changes a {delta} weight but {model}'s {key} is "
                                f"{shape}; pass a LoRA for this model's size")
            out[key].append((down, up, scale * alpha / rank))
    return dict(out)


def fuse(base: torch.Tensor, changes: list) -> torch.Tensor:
    """W + sum(factor * up @ down), in fp32, from the base weight."""
    weight = base.to(torch.float32, copy=True)
    for down, up, factor in changes:
        weight += factor * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    return weight


def fused(source: WeightSource, changes: dict, describe: str) -> WeightSource:
    """`source` with LoRA changes ({key: terms}, `terms`) fused into the weights they touch, each from its base
    weight in fp32 (`fuse`), then cast to the requested dtype; untouched weights stay where they are stored."""
    shapes = source.shapes()

    def chunks(key: str, dtype: torch.dtype):
        if key not in changes:
            yield from source.chunks(key, dtype)
            return
        raw = bytearray(b"".join(source.chunks(key, torch.float32)))
        base = torch.frombuffer(raw, dtype=torch.float32).reshape(shapes[key])
        yield tensor_bytes(fuse(base, changes[key]).to(dtype))

    return WeightSource(shapes, chunks, f"{source.describe} {describe}",
                        lambda key, dtype: None if key in changes else source.stored(key, dtype))


def load_with_diffusers(network: torch.nn.Module, family: str, loras) -> None:
    """Load and fuse the LoRAs into `network` in place with diffusers itself (`load_lora_weights`, `set_adapters`,
    `fuse_lora`, peft underneath): the reference that `validate --lora` holds the export's fusion to."""
    import inspect

    try:
        import peft  # noqa: F401
    except ImportError:
        from .errors import MissingComponent

        raise MissingComponent("the LoRA reference is loaded by diffusers, which needs peft: pip install "
                               "'toma-export[lora]' (or peft>=0.17)") from None
    if family == "flux":
        from diffusers import FluxPipeline as Pipeline
    else:
        from diffusers import StableDiffusionXLPipeline as Pipeline
    part = _PREFIX[family][:-1]
    needed = [n for n, p in inspect.signature(Pipeline.__init__).parameters.items()
              if n != "self" and p.default is inspect.Parameter.empty]
    pipe = Pipeline(**{**dict.fromkeys(needed), part: network})      # only the network: nothing else is loaded
    names = [f"lora{i}" for i in range(len(as_options(loras)))]
    quiet = logging.getLogger("diffusers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)          # "no LoRA keys for the text encoder": it is not there on purpose
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")    # peft: "multiple adapters in the model", which is what is asked for
            for name, (path, _) in zip(names, as_options(loras)):
                pipe.load_lora_weights(path, adapter_name=name)
            pipe.set_adapters(names, [scale for _, scale in as_options(loras)])
            pipe.fuse_lora(components=[part])
            pipe.unload_lora_weights()
    finally:
        quiet.setLevel(level)


def _modules(path: str, family: str, model: str, progress=None) -> dict:
    """{module: (down fp32, up fp32, alpha)} of the network's part of the LoRA, keys as the network names them."""
    state, alphas, metadata = _read(path, family, model)
    prefix = _PREFIX[family]
    from diffusers.utils import convert_unet_state_dict_to_peft

    ours = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    encoders = sorted({k.split(".", 1)[0] for k in state if k.startswith("text_encoder")})
    if ours and encoders and progress:
        progress(f"[lora] {Path(path).name}: its {', '.join(encoders)} weights are not applied: the export holds the "
                 f"{prefix[:-1]} only, and the pipeline's text encoders run as they are")
    if not ours:
        others = sorted({k.split(".", 1)[0] for k in state})
        other = next((f for f, p in _PREFIX.items() if p[:-1] in others), None)
        if other:
            raise _other_family(path, other, family, model)
        raise LoRAError(f"LoRA {Path(path).name} holds no {_LABEL[family]} network weights (only "
                        f"{', '.join(others) or 'nothing'}); pass a LoRA that changes the {prefix[:-1]}")
    if any("lora_magnitude_vector" in k or "dora_scale" in k for k in ours):
        raise LoRAError(f"LoRA {Path(path).name} is a DoRA, which toma-export does not fuse; pass a plain LoRA")
    if any(k.endswith("lora_B.bias") or k.endswith("lora.up.bias") for k in ours):
        raise LoRAError(f"LoRA {Path(path).name} trains biases (lora_bias), which toma-export does not fuse; "
                        "pass a LoRA without them")
    ours = convert_unet_state_dict_to_peft(ours)          # old diffusers names (lora.down, processor.) -> peft's
    pairs: dict = {}
    for key, value in ours.items():
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise LoRAError(f"LoRA {Path(path).name}: {key} is not a lora_A/lora_B weight; pass a LoRA in the "
                            "diffusers, peft or kohya format")
        pairs.setdefault(match[1], {})[match[2]] = value.to(torch.float32)
    config = {k[len(prefix):]: v for k, v in (metadata or {}).items() if k.startswith(prefix)}
    alpha_of = _alpha_rule(path, prefix, alphas, config)
    out = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise LoRAError(f"LoRA {Path(path).name}: {module} has lora_{next(iter(pair))} without its pair; "
                            "the file is damaged")
        out[module] = (pair["A"], pair["B"], alpha_of(module, pair["A"].shape[0]))
    return out


def _alpha_rule(path: str, prefix: str, alphas: dict | None, config: dict):
    """module, rank -> alpha, as diffusers configures peft for this file."""
    if config.get("r") is not None:                        # adapter metadata that diffusers saved: peft's config
        patterns, alpha = config.get("alpha_pattern") or {}, config.get("lora_alpha", config["r"])
        rslora = config.get("use_rslora", False)

        def from_config(module, rank):
            value = next((v for p, v in patterns.items() if re.fullmatch(rf"(.*\.)?{p}", module)), alpha)
            return value * math.sqrt(rank) if rslora else value       # peft: alpha / sqrt(r) with rsLoRA
        return from_config
    if not alphas:
        return lambda module, rank: rank                   # no alpha anywhere: scale 1
    from diffusers.utils import convert_unet_state_dict_to_peft

    per_module = {}
    for key, value in alphas.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        name = name[:-len(".alpha")] if name.endswith(".alpha") else name
        if not name.endswith(".weight"):
            name += ".lora_A.weight"
        converted = next(iter(convert_unet_state_dict_to_peft({name: None})))
        per_module[converted.split(".lora_A")[0]] = float(value)
    common = collections.Counter(per_module.values()).most_common(1)[0][0]
    return lambda module, rank: per_module.get(module, common)


def _other_family(path: str, other: str, family: str, model: str) -> LoRAError:
    return LoRAError(f"LoRA {Path(path).name} is for {_LABEL[other]}, but {model} is {_LABEL[family]}; pass a LoRA "
                     f"trained for {_LABEL[family]}")


def _read(path: str, family: str, model: str):
    """diffusers' reading of the file: (state dict, alphas, adapter metadata); a LoRA for the other family is
    named as such before its converter can fail on it."""
    keys = []
    with contextlib.suppress(Exception):          # not safetensors: diffusers' reading below says what it is
        keys = list(safetensors_header(Path(path)))
    own = any(m in k for k in keys for m in _MARKERS[family])
    other = next((f for f in _MARKERS if f != family and any(m in k for k in keys for m in _MARKERS[f])), None)
    if other and not own:
        raise _other_family(path, other, family, model)
    if family == "flux":
        from diffusers import FluxPipeline as Pipeline
        kwargs = dict(return_alphas=True, return_lora_metadata=True)
    else:
        from diffusers import StableDiffusionXLPipeline as Pipeline
        kwargs = dict(return_lora_metadata=True)
    quiet = logging.getLogger("diffusers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            state, alphas, metadata = Pipeline.lora_state_dict(path, **kwargs)
    except Exception as err:           # diffusers' converters assert and raise freely on files they do not know
        raise LoRAError(f"LoRA {Path(path).name}: diffusers cannot read it as a {_LABEL[family]} LoRA "
                        f"({type(err).__name__}: {str(err)[:160] or 'a converter assertion'}); pass a LoRA in the "
                        "diffusers, peft or kohya format for this model") from None
    finally:
        quiet.setLevel(level)
    return state, alphas, metadata
