"""`toma-export generate`: one image from a diffusers pipeline whose transformer / UNet is an exported
ToMA graph (ONNX Runtime) or engine (TensorRT), with a latency table per stage.

Without --onnx / --engine it exports (or reuses from the cache) what the machine's best backend needs: the
static ONNX export at --size, plus the baseline export when the schedule leaves steps unmerged.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

DEFAULT_GUIDANCE = {"flux": 3.5, "sdxl": 5.0}


def _size(text: str) -> tuple[int, int]:
    from ..cli import _size as parse

    return parse(text)


def _merge_steps(text: str):
    """'3' -> every 3rd step; '0,1,4' -> those steps."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"merge steps must be a period (3) or a list of steps (0,2,5), got {text!r}")
    return int(parts[0]) if len(parts) == 1 and "," not in text else [int(p) for p in parts]


def add_parser(sub) -> None:
    from ..cli import add_toma_options

    p = sub.add_parser("generate", help="generate an image with a pipeline running the exported ToMA graph or engine")
    p.add_argument("--model", required=True, help="flux, sdxl, flux-tiny, sdxl-tiny or a local diffusers pipeline folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--onnx", help="an exported model.onnx to run in ONNX Runtime (default: export or reuse one)")
    src.add_argument("--engine", help="a built engine's engine.json to run in TensorRT (default: build or reuse one)")
    p.add_argument("--baseline", help="the same model exported/built without ToMA, for steps the schedule leaves "
                                      "unmerged (default with --onnx/--engine: none)")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"],
                   help="default: tensorrt with CUDA and TensorRT, else onnxruntime (or what --onnx/--engine imply)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=int, default=28, help="denoising steps (28)")
    p.add_argument("--size", type=_size, help="HEIGHTxWIDTH in pixels (the model's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, help="guidance scale (FLUX 3.5, SDXL 5.0; SDXL above 1 runs CFG at batch 2)")
    p.add_argument("--out", required=True, help="PNG file to write")
    add_toma_options(p)
    p.add_argument("--merge-steps", type=_merge_steps,
                   help="steps that merge: a period k (0, k, 2k...) or a list 0,2,5 (all); others run the baseline")
    p.add_argument("--dst-every", type=int, default=1, help="recompute destinations every n-th merged step (1)")
    p.add_argument("--no-toma", action="store_true", help="serve the baseline export without ToMA")
    p.add_argument("--no-share-weights", action="store_true",
                   help="onnxruntime: give the baseline session its own weights (faster kernels, twice the memory)")
    p.add_argument("--output-dir", help="export / engine cache (engines/out)")
    p.add_argument("--force", action="store_true", help="export or build again even if cached")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=cmd_generate)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_generate(args) -> int:
    from ..cli import stdout_on_stderr

    with stdout_on_stderr():            # TensorRT logs to stdout, which carries the --json object alone
        result = _generate(args)
    print(json.dumps(result) if args.json else _table(result))
    return 0


def _generate(args) -> dict:
    import torch
    from transformers.utils import logging as transformers_logging

    # transformers warns about torchvision-backed image processors that these pipelines never use
    transformers_logging.set_verbosity_error()

    from .. import models
    from ..cli import toma_config
    from .network import load_network
    from .pipeline import attach, best_backend, load_pipeline, serving_artifacts

    torch.set_grad_enabled(False)
    spec = models.get(args.model)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    height, width = spec.size(*(args.size or (None, None)))
    backend = ("tensorrt" if args.engine else "onnxruntime" if args.onnx else None) or args.backend or best_backend()
    if (args.engine and args.backend == "onnxruntime") or (args.onnx and args.backend == "tensorrt"):
        raise ValueError(f"--backend {args.backend} does not run {'--engine' if args.engine else '--onnx'} files")
    guidance = DEFAULT_GUIDANCE[spec.family] if args.guidance is None else args.guidance
    cfg_batch = 2 if spec.family == "sdxl" and guidance > 1 else 1
    t_start = time.perf_counter()
    schedule = None
    if args.onnx or args.engine:
        toma_path, base_path = args.onnx or args.engine, args.baseline
        if args.merge_steps is not None or args.dst_every != 1:       # the file's settings, another schedule
            from .artifact import Artifact

            recorded = Artifact.load(toma_path).config
            schedule = recorded and replace(recorded, merge_steps=args.merge_steps, dst_every=args.dst_every)
    else:
        config = None if args.no_toma else _config(args, toma_config)
        toma_path, base_path = serving_artifacts(args.model, config, (height, width), cfg_batch, backend,
                                                 args.output_dir, args.force, _progress)
    _progress(f"[generate] loading the {spec.family} pipeline ({spec.name}) and the {backend} network")
    network = load_network(toma_path or base_path, base_path if toma_path else None,
                           share_weights=not args.no_share_weights, schedule=schedule)
    pipe = load_pipeline(args.model, network=False, seed=args.seed)
    attach(pipe, network)
    if network.device.type == "cuda":
        pipe.to("cuda")
    stages = _instrument(pipe)
    t_ready = time.perf_counter()
    kwargs = dict(height=height, width=width, num_inference_steps=args.steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(args.seed), callback_on_step_end=stages.step_end)
    if spec.family == "flux":
        kwargs["max_sequence_length"] = spec.text_len
    _progress(f"[generate] {args.steps} steps at {height}x{width} px on {network.provider}")
    image = pipe(args.prompt, **kwargs).images[0]
    t_done = time.perf_counter()
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")
    return _result(args, spec, backend, network, toma_path, base_path, (height, width), guidance, stages,
                   setup=t_ready - t_start, total=t_done - t_ready, out=out)


def _config(args, toma_config):
    config = toma_config(args)
    return replace(config, merge_steps=args.merge_steps, dst_every=args.dst_every)


class _Stages:
    """Wall times of the pipeline's stages: text encoding and VAE decoding are wrapped, denoising steps
    are the intervals between step-end callbacks, starting when encoding ends."""

    def __init__(self):
        self.encode = self.decode = 0.0
        self.encode_end = None
        self.step_ends: list[float] = []

    def step_end(self, pipe, step, timestep, kwargs):
        self.step_ends.append(time.perf_counter())
        return kwargs

    def steps(self) -> list[float]:
        marks = [self.encode_end] + self.step_ends
        return [b - a for a, b in zip(marks, marks[1:])]


def _instrument(pipe) -> _Stages:
    stages = _Stages()
    encode, decode = pipe.encode_prompt, pipe.vae.decode

    def timed_encode(*a, **k):
        t0 = time.perf_counter()
        try:
            return encode(*a, **k)
        finally:
            stages.encode_end = time.perf_counter()
            stages.encode += stages.encode_end - t0

    def timed_decode(*a, **k):
        t0 = time.perf_counter()
        try:
            return decode(*a, **k)
        finally:
            stages.decode += time.perf_counter() - t0

    pipe.encode_prompt, pipe.vae.decode = timed_encode, timed_decode
    return stages


def _result(args, spec, backend, network, toma_path, base_path, size, guidance, stages, setup, total, out) -> dict:
    steps = stages.steps()
    graph = [t for _, t in network.timings]
    ms = lambda s: round(s * 1e3, 2)  # noqa: E731
    config = network.schedule.config
    return dict(
        image=str(out), model=spec.name, backend=backend, provider=network.provider, onnx_or_engine=toma_path,
        baseline=base_path, height=size[0], width=size[1], steps=args.steps, seed=args.seed, guidance=guidance,
        prompt=args.prompt,
        toma=dict(ratio=config.ratio, tile=list(config.tile), merge_steps=config.merge_steps,
                  dst_every=config.dst_every) if config else None,
        calls=dict(network.calls), weights_shared=network.sharing.summary() if network.sharing else None,
        latency_ms=dict(setup=ms(setup), text_encode=ms(stages.encode), denoise_total=ms(sum(steps)),
                        denoise_per_step=ms(statistics.mean(steps)) if steps else None,
                        network_per_call_median=ms(statistics.median(graph)) if graph else None,
                        vae_decode=ms(stages.decode), total=ms(total)))


def _table(r: dict) -> str:
    lat = r["latency_ms"]
    toma = r["toma"]
    lines = [f"{r['image']}  ({r['model']}, {r['height']}x{r['width']} px, {r['steps']} steps, seed {r['seed']}, "
             f"guidance {r['guidance']})",
             f"  {r['backend']} on {r['provider']}: {r['onnx_or_engine'] or r['baseline']}"]
    if toma:
        lines.append(f"  ToMA ratio {toma['ratio']}, tile {toma['tile'][0]}x{toma['tile'][1]}, merge_steps "
                     f"{toma['merge_steps'] or 'all'}, dst_every {toma['dst_every']}: {r['calls']['toma']} merged "
                     f"call(s) ({r['calls']['recompute']} selecting), {r['calls']['baseline']} unmerged")
    if r["weights_shared"]:
        lines.append(f"  weights: {r['weights_shared']}")
    lines.append(f"  {'stage':<26}{'ms':>10}")
    for key, label in (("text_encode", "text encode"), ("denoise_total", "denoise total"),
                       ("denoise_per_step", "  per step"), ("network_per_call_median", "  network call (median)"),
                       ("vae_decode", "VAE decode"), ("total", "total (pipeline call)"), ("setup", "setup (not in total)")):
        if lat[key] is not None:
            lines.append(f"  {label:<26}{lat[key]:>10.1f}")
    return "\n".join(lines)
