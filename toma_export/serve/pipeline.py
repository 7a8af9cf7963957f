"""Pipelines to serve: a diffusers pipeline for a model name, the artifacts it needs, and the drop-in.

Real models load with `FluxPipeline` / `StableDiffusionXLPipeline.from_pretrained` (hub cache or a local
folder); the tiny models get theirs from the spec's tiny_parts (the trained VAE, the frozen text encoders
the networks were trained with). With `network=False` the PyTorch transformer/UNet is not loaded at all:
the served graph replaces it, so its weights are held once, by the runtime.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from .. import models, quantize
from ..errors import ModelNotAvailable, UsageError
from ..toma import ToMAConfig



def load_pipeline(model: str, dtype: torch.dtype = torch.float32, network=True, controlnets=None):
    """The diffusers pipeline for `model` (a registered name or a local pipeline folder).

    network: True loads the PyTorch network, False leaves it out (set a served one afterwards), a module
    is used as is. Tiny models: the trained network and VAE (the weights their exports hold) and the frozen
    random text encoders the network was trained with. An image's seed is the caller's generator, never this.
    controlnets: modules (PyTorch ControlNets or served ones) make it the family's ControlNet pipeline, which
    resizes and encodes the control images and sums several ControlNets' residuals."""
    import diffusers

    spec = models.get(model)
    check_pipeline(spec)
    cls = getattr(diffusers, spec.controlnet_pipeline_class if controlnets else spec.pipeline_class)
    attr = spec.subfolder
    given = {} if network is True else {attr: network or None}
    if controlnets:
        given["controlnet"] = controlnets[0] if len(controlnets) == 1 else list(controlnets)
    if spec.source is None:
        parts = spec.tiny_parts()
        net = spec.load(dtype) if network is True else given[attr]
        extra = {"controlnet": given["controlnet"]} if controlnets else {}
        pipe = cls(scheduler=spec.scheduler(), **parts, **{attr: net}, **extra)
        for name in ("text_encoder", "text_encoder_2", "vae"):
            torch.nn.Module.to(getattr(pipe, name), dtype)
        return pipe
    try:
        return cls.from_pretrained(spec.source, torch_dtype=dtype, **given)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelNotAvailable(
            f"{spec.name}: cannot load the {cls.__name__} from {spec.source!r} ({type(err).__name__}: not in the "
            f"Hugging Face cache and not downloadable here); download it where the hub is reachable "
            f"(`huggingface-cli download {spec.source}`) or pass a local diffusers pipeline folder as --model PATH"
        ) from None


def check_pipeline(spec) -> None:
    """Refuse, before any export, what cannot become a text-to-image pipeline: a refiner, a folder holding
    only the network, a pipeline folder without its text encoders, tokenizers, VAE or scheduler."""
    if spec.variant == "refiner":
        raise UsageError(f"{spec.name} is an SDXL refiner (image-to-image); generate and serve run text-to-image "
                         "models such as SDXL base; export and validate take the refiner")
    folder = Path(spec.source) if spec.source else None
    if folder is None or not folder.is_dir():
        return
    if not (folder / "model_index.json").is_file():
        raise UsageError(f"{spec.name} holds only the {spec.family} network; generating needs the whole pipeline "
                         f"folder (model_index.json, text encoders, VAE, scheduler): pass the folder above it")
    missing = [part for part in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler")
               if not (folder / part).is_dir()]
    if missing:
        raise ModelNotAvailable(f"{spec.name}: the pipeline folder lacks {', '.join(missing)}, which generating "
                                "needs; download the whole pipeline (export, build and validate need only "
                                f"{spec.subfolder}/)")


def attach(pipe, network) -> None:
    """Put a ServedNetwork where the pipeline keeps its transformer / UNet."""
    attr = "transformer" if hasattr(pipe, "transformer") else "unet"
    setattr(pipe, attr, network)


def best_backend() -> str:
    """tensorrt where CUDA and full TensorRT are usable, else onnxruntime (the CPU fallback)."""
    if torch.cuda.is_available():
        from ..trt import backend

        try:
            if backend.load("tensorrt")[0] == "tensorrt":
                return "tensorrt"
        except backend.BackendMissing:
            pass
    return "onnxruntime"


def needs_baseline(config: ToMAConfig | None) -> bool:
    """Whether the schedule leaves steps unmerged (they run the baseline graph)."""
    return config is not None and config.merge_steps is not None


def serving_artifacts(model: str, config: ToMAConfig | None, size: tuple[int, int], batch: int, backend: str,
                      output_dir=None, force: bool = False, progress=None,
                      loras: tuple = (), cache=None, quant=None) -> tuple[str | None, str | None]:
    """(ToMA artifact, baseline artifact) for `backend`, exported or built, or reused from the cache.

    ONNX Runtime gets static exports at `size` and `batch`; TensorRT gets engines whose profile is pinned to
    `size` (batch and text length stay ranges, so CFG batches fit). With a First-Block Cache the network is
    exported as its head and tail, and the tail (ToMA's, or the baseline's without ToMA) is returned. `quant`
    (quantize.Quantization): both graphs 8-bit, with the same scales."""
    from ..resources import default_output

    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(output_dir or default_output())
    if cache is not None:
        quantize.refuse(quant and quant.mode, loras, cache)
        return _split_artifacts(model, config, size, batch, backend, out, force, progress, loras, cache)
    wanted = ([config] if config is not None else []) + ([None] if config is None or needs_baseline(config) else [])
    paths = {}
    for cfg in wanted:
        if backend == "onnxruntime":
            from ..onnx import ExportOptions, export_in_child      # the pipeline loads next: keep its peak low

            options = ExportOptions(height=size[0], width=size[1], batch=batch, loras=loras, quant=quant)
            meta = export_in_child(model, cfg, out / "onnx", options, force=force, progress=progress)
            paths[cfg is not None] = meta["onnx"]
        elif backend == "tensorrt":
            from ..trt import BuildOptions, build

            meta = build(model, cfg, out, BuildOptions(backend="tensorrt", min_size=size, opt_size=size,
                                                       max_size=size, loras=loras, quant=quant), force=force,
                         progress=progress)
            paths[cfg is not None] = str(Path(meta["engine"]).with_name("engine.json"))
        else:
            raise UsageError(f"backend must be onnxruntime or tensorrt, got {backend!r}")
    return paths.get(True), paths.get(False)


def controlnet_artifacts(model: str, controlnets: list[str], config: ToMAConfig | None, size: tuple[int, int],
                         batch: int, backend: str, output_dir=None, force: bool = False, progress=None,
                         controlnet_toma: bool = True, loras: tuple = ()) -> tuple[tuple, list[tuple]]:
    """((network ToMA, baseline), [(ControlNet ToMA, baseline) per ControlNet]): static ONNX exports at `size` and
    `batch`, the network taking the ControlNets' residuals, each ControlNet its own graph (ToMA in it unless
    `controlnet_toma` is false); baselines where the schedule leaves steps unmerged."""
    from ..onnx import ExportOptions, export_in_child
    from ..onnx.export import export_controlled
    from ..resources import default_output

    if backend != "onnxruntime":
        raise UsageError("ControlNets are served through ONNX Runtime so far; pass --backend onnxruntime (TensorRT "
                         "engines of ControlNets: docs/controlnet.md)")
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(output_dir or default_output()) / "onnx"
    wanted = ([config] if config is not None else []) + ([None] if config is None or needs_baseline(config) else [])
    network, nets = {}, {name: {} for name in controlnets}
    for cfg in wanted:
        options = ExportOptions(height=size[0], width=size[1], batch=batch, loras=loras)
        both = export_controlled(model, list(controlnets), cfg, out, options, controlnet_toma=controlnet_toma,
                                 force=force, progress=progress, make=export_in_child)
        network[cfg is not None] = both["network"]["onnx"]
        for name, meta in zip(dict.fromkeys(controlnets), both["controlnets"]):
            nets[name][meta["toma"] is not None] = meta["onnx"]
    return (network.get(True), network.get(False)), [(nets[n].get(True), nets[n].get(False)) for n in controlnets]


def _split_artifacts(model, config, size, batch, backend, out: Path, force, progress, loras, cache):
    from ..cache import check_family
    from ..onnx import ExportOptions, export_in_child
    from ..onnx.export import export_split

    check_family(cache, models.get(model))
    if needs_baseline(config):
        raise UsageError(f"First-Block Cache runs with ToMA on every step; drop --merge-steps {config.merge_steps!r} "
                         "or pass --cache none")
    if backend == "onnxruntime":
        options = ExportOptions(height=size[0], width=size[1], batch=batch, loras=loras)
        tail = export_split(model, config, out / "onnx", options, force=force, progress=progress,
                            make=export_in_child)["onnx"]
    elif backend == "tensorrt":
        from ..trt import BuildOptions, build_split

        meta = build_split(model, config, out, BuildOptions(backend="tensorrt", opt_size=size, static=True,
                                                            loras=loras), force=force, progress=progress)
        tail = str(Path(meta["engine"]).with_name("engine.json"))
    else:
        raise UsageError(f"backend must be onnxruntime or tensorrt, got {backend!r}")
    return (tail, None) if config is not None else (None, tail)
