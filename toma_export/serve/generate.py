"""Generate one image with a diffusers pipeline whose transformer / UNet is an exported ToMA graph (ONNX
Runtime) or engine (TensorRT), timing each stage.

Without an ONNX file or engine it exports (or reuses from the cache) what the machine's best backend needs:
the static ONNX export at the size, plus the baseline export when the schedule leaves steps unmerged.
The loaded pipeline is a Session, which the Triton pipeline model (triton_model.py) also keeps, so both run
one denoising loop.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..artifacts import toma_section
from ..cache import label
from ..errors import UsageError
from ..toma import ToMAConfig



@dataclass(frozen=True)
class GenerateRequest:
    model: str
    prompt: str
    out: str                               # PNG file to write
    steps: int = 28
    size: tuple | None = None              # (height, width) pixels; None: the model's default
    seed: int = 0
    guidance: float | None = None          # None: the family's default
    config: ToMAConfig | None = None       # None: serve the baseline (no ToMA); ignored with onnx/engine
    schedule: dict | None = None           # merge_steps / dst_every / weights_every overriding a file's
    onnx: str | None = None
    engine: str | None = None
    baseline: str | None = None
    backend: str | None = None             # onnxruntime | tensorrt; None: the machine's best
    share_weights: bool = True
    output_dir: str | None = None
    force: bool = False
    loras: tuple = ()                      # ((path, scale), ...) fused into the exported weights
    cache: object = None                   # toma_export.cache.CacheConfig: First-Block Cache (FLUX), or None
    quant: object = None                   # toma_export.quantize.Quantization: serve the 8-bit graph
    controlnets: tuple = ()                # ((name or folder, scale), ...): their residuals summed
    control_images: tuple = ()             # one image file per ControlNet
    control_modes: tuple = ()              # a Union ControlNet's mode per ControlNet (families.controlnet.control_modes)
    controlnet_toma: bool = True           # ToMA in the ControlNets' own blocks too


def generate(args: GenerateRequest, progress) -> dict:
    """Run the request; returns what was made and how long each stage took."""
    import torch
    from transformers.utils import logging as transformers_logging

    # transformers warns about torchvision-backed image processors that these pipelines never use
    transformers_logging.set_verbosity_error()

    from .. import models
    from ..families.controlnet import control_modes
    from .pipeline import best_backend, check_pipeline, serving_artifacts

    torch.set_grad_enabled(False)
    spec = models.get(args.model)
    check_pipeline(spec)                          # before any export
    from ..cache import check_family

    check_family(args.cache, spec)
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    height, width = spec.size(*(args.size or (None, None)))
    backend = ("tensorrt" if args.engine else "onnxruntime" if args.onnx else None) or args.backend or best_backend()
    if (args.engine and args.backend == "onnxruntime") or (args.onnx and args.backend == "tensorrt"):
        raise UsageError(f"--backend {args.backend} does not run {'--engine' if args.engine else '--onnx'} files")
    guidance = spec.default_guidance if args.guidance is None else args.guidance
    cfg_batch = spec.cfg_batch(guidance)
    t_start = time.perf_counter()
    schedule = None
    if (args.onnx or args.engine) and args.loras:
        raise UsageError("--onnx/--engine files carry their own weights; drop --lora, or export/build with --lora "
                         "and pass that file")
    controls = check_controls(spec, args.controlnets, args.control_images)   # images read before any export
    controlnets = ()
    control_modes([models.get(name) for name, _ in args.controlnets], args.control_modes)     # before any export
    if args.controlnets and (args.onnx or args.engine or args.cache is not None or args.quant is not None):
        raise UsageError("--controlnet exports its own graphs: drop --onnx/--engine, --cache and --quantize")
    if args.controlnets:
        from .pipeline import controlnet_artifacts

        (toma_path, base_path), controlnets = controlnet_artifacts(
            args.model, [name for name, _ in args.controlnets], args.config, (height, width), cfg_batch, backend,
            args.output_dir, args.force, progress, controlnet_toma=args.controlnet_toma, loras=args.loras)
    elif args.onnx or args.engine:
        toma_path, base_path = args.onnx or args.engine, args.baseline
        if args.schedule:                  # the file's settings, another schedule
            from ..artifacts import Artifact

            recorded = Artifact.load(toma_path).config
            schedule = recorded and replace(recorded, **args.schedule)
    else:
        toma_path, base_path = serving_artifacts(args.model, args.config, (height, width), cfg_batch, backend,
                                                 args.output_dir, args.force, progress, loras=args.loras,
                                                 cache=args.cache, quant=args.quant)
    progress(f"[generate] loading the {spec.family} pipeline ({spec.name}) and the {backend} network")
    session = Session(toma_path, base_path, share_weights=args.share_weights, schedule=schedule,
                      model=args.model, cache=args.cache, controlnets=controlnets, control_modes=args.control_modes)
    t_ready = time.perf_counter()
    progress(f"[generate] {args.steps} steps at {height}x{width} px on {session.network.provider}")
    scales = [scale for _, scale in args.controlnets] or [1.0] * len(controls)
    image = session.run([args.prompt], [args.seed], height, width, args.steps, guidance,
                        controls=list(zip(controls, scales)))[0]
    t_done = time.perf_counter()
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")
    result = _result(args, spec, backend, session.network, toma_path, base_path, (height, width), guidance,
                     session.stages, setup=t_ready - t_start, total=t_done - t_ready, out=out)
    result["controlnets"] = [dict(model=name, scale=scale, onnx_or_engine=t, baseline=b, calls=dict(net.calls))
                             for (name, scale), (t, b), net in zip(args.controlnets, controlnets, session.controlnets)]
    result["control_images"] = list(args.control_images)
    return result


def check_controls(spec, controlnets, images) -> list:
    """The control images, one per ControlNet (a channel-concat control model: one of its own), read and checked
    before any work (a file that is not an image, a wrong count); as RGB PIL images, which the pipeline resizes."""
    if spec.channel_control:
        if controlnets or len(images) != 1:
            raise UsageError(f"{spec.name} concatenates its control image's latents: give one --control-image and no "
                             "--controlnet")
    elif len(images) != len(controlnets):
        raise UsageError(f"{len(controlnets)} --controlnet and {len(images)} --control-image: give one control image "
                         "per ControlNet, in the same order")
    from PIL import Image, UnidentifiedImageError

    out = []
    for path in images:
        try:
            with Image.open(Path(path).expanduser()) as image:
                out.append(image.convert("RGB"))
        except FileNotFoundError:
            raise UsageError(f"--control-image {path}: no such file") from None
        except (UnidentifiedImageError, OSError) as err:
            raise UsageError(f"--control-image {path} is not an image PIL can read ({type(err).__name__}); pass a "
                             "PNG or JPEG") from None
    return out


class Stopped(RuntimeError):
    """A run ended early, after `step` of `steps` denoising steps: its requests were cancelled or ran out of
    time (Session.run's `stop`)."""

    def __init__(self, reason: str, step: int, steps: int):
        super().__init__(f"{reason} after step {step} of {steps}")
        self.reason, self.step, self.steps = reason, step, steps


class Session:
    """A pipeline whose network is the served graph or engine, loaded once and run for many requests: the
    `generate` command runs one, the Triton pipeline model (triton_model.py) keeps one per model instance.

    Every run starts the network's ToMA schedule afresh, so destinations never pass from one request to the
    next; the prompts of one run form one batch and each gets its own destinations from the graph.
    A request's seed seeds its initial noise and nothing else (the pipeline's parts are fixed at load)."""

    def __init__(self, toma_path, base_path=None, share_weights: bool = True, schedule=None,
                 model: str | None = None, cache=None, controlnets=(), control_modes=()):
        import torch

        from .network import load_network
        from .pipeline import attach, load_pipeline

        torch.set_grad_enabled(False)
        self.network = load_network(toma_path or base_path, base_path if toma_path else None,
                                    share_weights=share_weights, schedule=schedule, cache=cache)
        # each ControlNet's graph (ToMA, baseline), served beside the network with the same schedule
        self.controlnets = [load_network(t or b, b if t else None, share_weights=share_weights, schedule=schedule)
                            for t, b in controlnets]
        if self.controlnets:              # a Union ControlNet's mode, fixed for the session (families.controlnet)
            from ..families import controlnet

            control_modes = controlnet.control_modes([net.spec for net in self.controlnets], control_modes)
        self.control_modes = tuple(control_modes)
        self.artifacts = [a for a in (self.network.toma_artifact, self.network.baseline_artifact) if a]
        self.spec = self.network.spec
        self.pipe = load_pipeline(model or self.artifacts[0].model, network=False, controlnets=self.controlnets)
        attach(self.pipe, self.network)
        if self.network.device.type == "cuda":
            self.pipe.to("cuda")
        self.stages = _instrument(self.pipe)

    def check(self, height: int, width: int, steps: int, guidance: float, count: int = 1) -> None:
        """Raise a one-line UsageError for a request the served graph cannot run (bad steps, a size that is
        no multiple of the model's or outside the export, a batch above its range), before any work."""
        if steps < 1:
            raise UsageError(f"steps must be >= 1, got {steps}")
        self.spec.size(height, width)
        batch = count * self.spec.cfg_batch(guidance)
        for artifact in [a for a in (self.network.head_artifact,) if a] + self.artifacts:     # a split's head first
            shapes = self.spec.input_shapes(batch, height, width, part=artifact.meta.get("part"))
            artifact.check_shapes({n: s for n, s in shapes.items() if n in artifact.input_names()}, (height, width))

    def max_requests(self, guidance: float) -> int:
        """How many requests one run may batch: the export's largest batch over the CFG batch."""
        batch = min(a.allowed(a.input_names()[0])[1][0] for a in self.artifacts)    # axis 0: the batch
        return max(1, batch // self.spec.cfg_batch(guidance))

    def run(self, prompts: list[str], seeds: list[int], height: int, width: int, steps: int, guidance: float,
            stop=None, controls=()):
        """One image (PIL) per prompt, each from its own seed's generator, in one pipeline call. `stop`, called
        after every denoising step, returns a reason to end the run there (raised as Stopped) or None. `controls`:
        (image, scale) per ControlNet, which the pipeline resizes to the image size."""
        import torch

        wanted = len(self.controlnets) or int(self.spec.channel_control)
        if len(controls) != wanted:
            raise UsageError(f"this pipeline takes {wanted} control image(s) (one per ControlNet, or a channel-concat "
                             f"model's one); got {len(controls)}")
        for net in [self.network, *self.controlnets]:
            net.reset()
        self.network.timings.clear()
        self.stages.__init__()
        generators = [torch.Generator().manual_seed(s) for s in seeds]

        def step_end(pipe, step, timestep, kwargs):
            kwargs = self.stages.step_end(pipe, step, timestep, kwargs)
            reason = stop and stop()
            if reason:
                raise Stopped(reason, step + 1, steps)
            return kwargs

        kwargs = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                      generator=generators[0] if len(generators) == 1 else generators,
                      callback_on_step_end=step_end)
        kwargs.update(self.spec.pipeline_kwargs())       # the graph's text length, where it fixes one
        if controls:
            kwargs.update(self.spec.control_kwargs([image for image, _ in controls], [scale for _, scale in controls],
                                                   self.control_modes))
        return self.pipe(prompts[0] if len(prompts) == 1 else list(prompts), **kwargs).images


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
        prompt=args.prompt, loras=[dict(file=p, scale=s) for p, s in args.loras],
        toma=toma_section(config), cache=label(network.cache and network.cache.config),
        quantize=(network.toma_artifact or network.baseline_artifact).meta.get("quantize"),
        computed_steps=args.steps - network.calls["cached"], cached_steps=network.calls["cached"],
        calls=dict(network.calls), weights_shared=network.sharing.summary() if network.sharing else None,
        latency_ms=dict(setup=ms(setup), text_encode=ms(stages.encode), denoise_total=ms(sum(steps)),
                        denoise_per_step=ms(statistics.mean(steps)) if steps else None,
                        network_per_call_median=ms(statistics.median(graph)) if graph else None,
                        vae_decode=ms(stages.decode), total=ms(total)))
