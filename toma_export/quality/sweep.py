"""`toma-export sweep`: quality and speed at each merge ratio (and step cache, and 8-bit mode), in one run, on one
backend.

Why: choosing a ratio is a trade-off between time saved and what the image loses. Every ratio draws the same
prompts from the same seeds; ratio 0 without a cache is the unmerged network and the reference of every quality
figure, so its fidelity is 1 by construction. Times are the whole network's median per denoising step (what ToMA
changes), its total per image (what a step cache changes too) and the end-to-end pipeline call per image (what a
user waits for). With caches, every ratio runs with each of them: the rows are ratios x caches. With 8-bit
modes (`--quantize none,int8`), each mode is calibrated with ToMA at the row's ratio, as `export --quantize`
would be, and the rows are ratios x caches x modes; the unquantized ratio 0 stays the reference. On the torch
backend a quantized row is fake-quantized (its quality is the graph's, its time is not); onnxruntime and
tensorrt run the 8-bit graphs.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cache import label
from ..errors import UsageError
from .. import shapes

REAL_PROMPTS = ("a photo of a red fox in the snow", "a lighthouse on a cliff at sunset",
                "a bowl of ramen on a wooden table", "an astronaut riding a horse, oil painting")
METRIC_NAMES = {
    "accuracy": "prompt accuracy (shapes judge: all three attributes match the caption; the stand-in for CLIP-T)",
    "fidelity": "judge fidelity (cosine of the shapes judge's features against ratio 0 at the same seed; "
                "the stand-in for DINO)",
    "frechet": "judge Fréchet distance to ratio 0 (on the shapes judge's features; the stand-in for FID)",
    "attributes": "the shapes judge's accuracy per attribute (colour, shape, background)",
    "clip_t": "CLIP-T (CLIP score of image and prompt, 0-100)",
    "dino": "DINO fidelity (cosine of DINOv2 CLS features against ratio 0 at the same seed)",
    "control_iou": "control IoU (the drawn shape against the control outline's filled region, held-out samples)",
    "control_centroid": "control centroid distance (drawn shape to outline, as a share of the image side)",
}


@dataclass(frozen=True)
class SweepRequest:
    model: str
    ratios: tuple = (0.0, 0.25, 0.5, 0.75)
    backend: str = "torch"
    prompts: tuple = ()                    # () = the model's default prompts
    seeds: int = 1
    steps: int = 28
    size: tuple | None = None
    guidance: float | None = None
    metrics: str | None = None             # judge | clip | none; None: judge for tiny models, clip otherwise
    clip: str | None = None
    dino: str | None = None
    toma: dict = field(default_factory=dict)   # ToMA options besides the ratio (levels, blocks, tile, ...)
    caches: tuple = (None,)                # CacheConfig or None (no cache) per column of the sweep
    quantizes: tuple = ("none",)           # 8-bit modes: none, int8, fp8 (quantize.MODES)
    quant_level: str = "3.0"
    calib_prompts: str | None = None
    calib_steps: int = 8
    output_dir: str | None = None
    grid_prompts: int = 8                  # rows of grid.png
    controlnet: str | None = None          # a ControlNet of the model: each image follows a held-out sample's outline
    controls: int = 24                     # with a ControlNet: how many held-out samples (images per row)


def default_prompts(spec) -> tuple:
    return tuple(shapes.grammar()) if spec.source is None else REAL_PROMPTS


def check(req: SweepRequest, spec) -> str:
    """Refuse a request in one line before any work; returns the metrics to compute."""
    if not req.ratios or any(not 0 <= r < 1 for r in req.ratios):
        raise UsageError(f"--ratios must be shares in [0, 1), got {','.join(map(str, req.ratios))}")
    if min(req.seeds, req.steps, req.grid_prompts) < 1:
        raise UsageError(f"--seeds, --steps and --grid-prompts must be >= 1, got {req.seeds}, {req.steps} and "
                         f"{req.grid_prompts}")
    if req.backend not in ("torch", "onnxruntime", "tensorrt"):
        raise UsageError(f"--backend must be torch, onnxruntime or tensorrt, got {req.backend!r}")
    from .. import cache

    for c in req.caches:
        cache.check_family(c, spec)
    from .. import quantize

    for mode in req.quantizes:
        quantize.check_mode(mode, req.quant_level)
        quantize.refuse(mode, cache=next((c for c in req.caches if c is not None), None))
    if any(m != "none" for m in req.quantizes) and not has_pipeline(spec):
        raise UsageError(f"{spec.name} holds only the {spec.family} network: calibrating --quantize runs the whole "
                         "pipeline; pass a pipeline folder")
    if req.controlnet:
        _check_controlnet(req, spec)
    from ..toma import ToMAConfig

    ToMAConfig(ratio=0.5, **req.toma)                 # the pass-through options, checked before any image
    metrics = req.metrics or ("judge" if spec.source is None else "clip")
    if metrics not in ("judge", "clip", "none"):
        raise UsageError(f"--metrics must be judge, clip or none, got {metrics!r}")
    if metrics == "judge":
        if spec.source is not None:
            raise UsageError(f"the shapes judge only reads the tiny models' shapes world, not {spec.name}; pass "
                             "--metrics clip with --clip/--dino folders, or --metrics none for speed only")
        for p in req.prompts:
            try:
                shapes.parse(p)
            except ValueError as err:
                raise UsageError(f"{err}; the judge scores captions of the grammar only (or pass --metrics none)") \
                    from None
    if not has_pipeline(spec) and (metrics != "none" or req.backend != "torch"):
        raise UsageError(f"{spec.name} holds only the {spec.family} network: sweep can time it (--metrics none, "
                         "--backend torch) but drawing images needs the whole pipeline folder")
    if metrics == "clip" and not (req.clip and req.dino):
        raise UsageError(f"{spec.name}: CLIP-T and DINO need --clip and --dino (a local folder or a hub id in the "
                         "cache, e.g. openai/clip-vit-large-patch14 and facebook/dinov2-base); or --metrics none for "
                         "speed only")
    return metrics


def _check_controlnet(req: SweepRequest, spec) -> None:
    from .. import models

    if req.backend != "torch":
        raise UsageError("sweep --controlnet runs on --backend torch so far (generate serves ControlNets in ONNX "
                         "Runtime)")
    if any(c is not None for c in req.caches) or any(m != "none" for m in req.quantizes):
        raise UsageError("sweep --controlnet takes no --cache or --quantize yet")
    if req.controls < 1:
        raise UsageError(f"--controls must be >= 1, got {req.controls}")
    if spec.source is not None or req.prompts:
        raise UsageError("sweep --controlnet draws the shapes world's held-out outlines with their own captions: "
                         "a tiny model, and no --prompt")
    controlnet = models.get(req.controlnet)
    if controlnet.family != spec.family or not controlnet.residual_layout():
        raise UsageError(f"{req.controlnet} is not a {spec.family} ControlNet")


def has_pipeline(spec) -> bool:
    """Whether the model comes with text encoders and a VAE (tiny models, pipeline folders), not just the network."""
    if spec.source is None:
        return True
    folder = Path(spec.source)
    return (folder / "model_index.json").is_file() and all((folder / p).is_dir() for p in ("text_encoder", "vae"))


class _Patched:
    """A PyTorch network patched at each ratio (0: unpatched), every forward call timed."""

    def __init__(self, net, toma: dict):
        self.net, self.toma, self.calls, self.cache = net, toma, [], None
        forward = net.forward

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return forward(*a, **k)
            finally:
                self.calls.append(time.perf_counter() - t0)

        net.forward = timed

    def set_variant(self, ratio: float, cache, quant=None):
        """The layers fake-quantized with `quant`'s scales (None: unquantized), ToMA at `ratio` (0: none), then
        diffusers' First-Block Cache (its hooks wrap the patched blocks)."""
        from ..cache import TorchCache
        from ..quantize import switch
        from ..toma import ToMAConfig, apply_toma, remove_toma

        if self.cache is not None:
            self.cache.disable()
            self.cache = None
        remove_toma(self.net)
        switch(self.net, quant)
        if ratio > 0:
            apply_toma(self.net, ToMAConfig(ratio=ratio, **self.toma))
        if cache is not None:
            self.cache = TorchCache(self.net, cache)

    def start(self):
        from ..toma import reset_toma

        if getattr(self.net, "_toma", None) is not None:
            reset_toma(self.net)
        if self.cache is not None:
            self.cache.reset()
        self.calls = []

    def decisions(self) -> list | None:
        """Per network call of the last run, whether it ran the whole network (None without a cache: all did)."""
        return None if self.cache is None else list(self.cache.decisions)


class _TorchRunner(_Patched):
    """The PyTorch pipeline with its network patched (and its ControlNet, patched alike)."""

    def __init__(self, model: str, toma: dict, controlnet: str | None = None):
        from .. import models
        from ..serve.pipeline import load_pipeline

        self.controlnet = models.get(controlnet).load() if controlnet else None
        self.pipe = load_pipeline(model, controlnets=[self.controlnet] if controlnet else None)
        self.pipe.set_progress_bar_config(disable=True)          # the sweep's own bar counts images
        super().__init__(self.pipe.transformer if hasattr(self.pipe, "transformer") else self.pipe.unet, toma)

    def set_variant(self, ratio: float, cache, quant=None):
        super().set_variant(ratio, cache, quant)
        if self.controlnet is not None:
            from ..toma import ToMAConfig, apply_toma, remove_toma

            remove_toma(self.controlnet)
            if ratio > 0:
                apply_toma(self.controlnet, ToMAConfig(ratio=ratio, **self.toma))

    def start(self):
        super().start()
        if self.controlnet is not None and getattr(self.controlnet, "_toma", None) is not None:
            from ..toma import reset_toma

            reset_toma(self.controlnet)

    def run(self, prompt, seed, height, width, steps, guidance, kwargs):
        self.start()
        image = self.pipe(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                          generator=torch.Generator().manual_seed(seed), **kwargs).images[0]
        return image, self.calls


class _NetworkRunner(_Patched):
    """Speed only, for a folder holding just the network (the real-size configurations with random weights):
    the family's denoising loop on sample inputs in fp32, at the CFG batch, without text encoders or VAE."""

    def __init__(self, spec, toma: dict, batch: int):
        self.spec, self.batch = spec, batch
        super().__init__(spec.load(torch.float32), toma)

    def run(self, prompt, seed, height, width, steps, guidance, kwargs):
        self.start()
        inputs = self.spec.sample_inputs(self.batch, height, width, seed, smooth=True)
        context = self.net.cache_context("cond") if self.cache else contextlib.nullcontext()
        with context:                      # diffusers' cache hooks keep their state per named context
            self.spec.denoise(inputs, steps, lambda i, kwargs: self.net(**kwargs, return_dict=False)[0])
        return None, self.calls


class _ServedRunner:
    """A Session (the generate command's and Triton's loop) on exported graphs or engines, one per ratio."""

    def __init__(self, model, backend, toma, size, batch, output_dir, progress):
        self.args = model, backend, toma, size, batch, output_dir, progress
        self.session = None

    def set_variant(self, ratio: float, cache, quant=None):
        from ..serve.generate import Session
        from ..serve.pipeline import serving_artifacts
        from ..toma import ToMAConfig

        model, backend, toma, size, batch, output_dir, progress = self.args
        config = ToMAConfig(ratio=ratio, **toma) if ratio > 0 else None
        toma_path, base_path = serving_artifacts(model, config, size, batch, backend, output_dir, progress=progress,
                                                 cache=cache, quant=quant)
        self.session = Session(toma_path, base_path, model=model, cache=cache)
        self.session.pipe.set_progress_bar_config(disable=True)

    def run(self, prompt, seed, height, width, steps, guidance, kwargs):
        image = self.session.run([prompt], [seed], height, width, steps, guidance)[0]
        return image, [t for _, t in self.session.network.timings]

    def decisions(self) -> list | None:
        cache = self.session.network.cache
        return None if cache is None else [d[2] for d in cache.decisions]


def sweep(req: SweepRequest, progress=None, quiet: bool = False) -> dict:
    """Run every ratio (x cache) over prompts x seeds; returns {"rows": [...], "images": [[PIL] per row], ...}."""
    from tqdm.auto import tqdm
    from transformers.utils import logging as transformers_logging

    from .. import models

    transformers_logging.set_verbosity_error()
    torch.set_grad_enabled(False)
    spec = models.get(req.model)
    metrics = check(req, spec)
    height, width = spec.size(*(req.size or (None, None)))
    guidance = spec.default_guidance if req.guidance is None else req.guidance
    prompts = req.prompts or default_prompts(spec)
    ratios = sorted(set(float(r) for r in req.ratios) | {0.0})          # ratio 0: every figure's reference
    caches = [None] + [c for c in dict.fromkeys(req.caches) if c is not None]     # no cache: the reference
    modes = ["none"] + [m for m in dict.fromkeys(req.quantizes) if m != "none"]    # unquantized: the reference
    variants = [(r, c, m) for m in modes for r in ratios for c in caches]
    scorer = _scorer(metrics, req)
    jobs = [(p, s) for p in prompts for s in range(req.seeds)]
    controls = None
    if req.controlnet:           # one held-out sample per image: its caption, its outline, seed = its index
        from .judge import CONTROL_SEED

        samples = [shapes.sample(CONTROL_SEED, i, height) for i in range(req.controls)]
        jobs = [(s.caption, i) for i, s in enumerate(samples)]
        prompts = [s.caption for s in samples]
        controls = [(spec.control_kwargs([s.control()], [1.0]), s.mask()) for s in samples]
    if req.backend == "torch" and not has_pipeline(spec):
        runner = _NetworkRunner(spec, req.toma, spec.cfg_batch(guidance))
    elif req.backend == "torch":
        runner = _TorchRunner(req.model, req.toma, req.controlnet)
    else:
        runner = _ServedRunner(req.model, req.backend, req.toma, (height, width), spec.cfg_batch(guidance),
                               req.output_dir, progress)
    kwargs = spec.pipeline_kwargs()
    images, rows = [], []
    with tqdm(total=len(variants) * len(jobs), desc=f"sweep {spec.name}", disable=quiet, dynamic_ncols=True) as bar:
        for ratio, cache, mode in variants:
            bar.set_postfix(ratio=ratio, **({"cache": str(cache)} if cache else {}),
                            **({"quantize": mode} if mode != "none" else {}))
            runner.set_variant(ratio, cache, _calibrated(req, mode, ratio, progress, quiet))
            extra = (lambda i: {**kwargs, **controls[i][0]}) if controls else (lambda i: kwargs)  # noqa: E731
            runner.run(jobs[0][0], jobs[0][1], height, width, 1, guidance, extra(0))     # warm-up: one step
            image_times, network_times, computed, drawn = [], [], [], []
            split = {True: [], False: []}          # call times where the whole network ran / the cache served
            for i, (prompt, seed) in enumerate(jobs):
                t0 = time.perf_counter()
                image, calls = runner.run(prompt, seed, height, width, req.steps, guidance, extra(i))
                image_times.append(time.perf_counter() - t0)
                network_times.append(sum(calls))
                decisions = runner.decisions() or [True] * len(calls)
                computed.append(sum(decisions) * req.steps / len(calls))
                for ran, t in zip(decisions, calls):
                    split[ran].append(t)
                drawn.append(image)
                bar.update()
            images.append(drawn)
            # with a cache, a step's time is a computed step's (cached steps cost the head only: cached_ms)
            row = dict(ratio=ratio, step_ms=1000 * statistics.median(split[True]),
                       image_s=statistics.median(image_times), images=len(drawn))
            if len(modes) > 1:
                row.update(quantize=mode)
            if len(caches) > 1:
                row.update(cache=label(cache), network_ms=1000 * statistics.median(network_times),
                           computed_steps=statistics.mean(computed),
                           cached_ms=1000 * statistics.median(split[False]) if split[False] else None)
            rows.append(row)
    base = dict(rows[0])
    for i, row in enumerate(rows):
        rows[i] = dict(ratio=row["ratio"], **({"cache": row["cache"]} if "cache" in row else {}),
                       **({"quantize": row["quantize"]} if "quantize" in row else {}),
                       step_ms=row["step_ms"], speedup=base["step_ms"] / row["step_ms"],
                       image_s=row["image_s"], image_speedup=base["image_s"] / row["image_s"], images=row["images"])
        if "cache" in row:
            rows[i].update(network_ms=row["network_ms"], network_speedup=base["network_ms"] / row["network_ms"],
                           computed_steps=row["computed_steps"], cached_ms=row["cached_ms"])
        rows[i].update(scorer(images[i], images[0], [p for p, _ in jobs]) if scorer else {})
        if controls:
            from . import judge

            found = judge.mean_control_scores(images[i], [mask for _, mask in controls], [p for p, _ in jobs])
            rows[i].update(control_iou=found["iou"], control_centroid=found["centroid"])
    return dict(model=spec.name, backend=req.backend, height=height, width=width, steps=req.steps,
                guidance=guidance, seeds=req.seeds, prompts=list(prompts), metrics=metrics,
                metric_names={k: v for k, v in METRIC_NAMES.items() if k in rows[0]},
                toma={k: list(v) if isinstance(v, tuple) else v for k, v in req.toma.items()},
                controlnet=req.controlnet, control_images=[s.control() for s in samples] if controls else None,
                caches=[label(c) for c in caches], quantize=modes,
                rows=rows, images=images, jobs=jobs)


def _calibrated(req: SweepRequest, mode: str, ratio: float, progress, quiet: bool):
    """The scales of `mode` calibrated with ToMA at `ratio`, as an export at that ratio would have them (reused
    from the calibration cache); None for none."""
    if mode == "none":
        return None
    from ..calibration import CalibrationOptions, calibrate
    from ..resources import default_output
    from ..toma import ToMAConfig

    config = ToMAConfig(ratio=ratio, **req.toma) if ratio > 0 else None
    options = CalibrationOptions(mode=mode, level=req.quant_level, prompts=req.calib_prompts, steps=req.calib_steps)
    return calibrate(req.model, config, options, Path(req.output_dir or default_output()) / "calib",
                     progress=progress, quiet=quiet)


def _scorer(metrics: str, req: SweepRequest):
    """images, reference images, captions -> the row's quality columns; None for speed only."""
    if metrics == "none":
        return None
    if metrics == "judge":
        from . import judge

        model, reference_features = judge.load(), []       # ratio 0's features, computed for the first row

        def score(images, reference, captions):
            if not reference_features:
                reference_features.append(judge.features(model, reference))
            feats, ref = judge.features(model, images), reference_features[0]
            return dict(**judge.scores(model, images, captions), fidelity=judge.fidelity(feats, ref),
                        frechet=judge.frechet(feats, ref))
        return score
    from . import encoders, judge

    clip, dino, reference_features = encoders.ClipScore(req.clip), encoders.DinoFeatures(req.dino), []

    def score(images, reference, captions):
        if not reference_features:
            reference_features.append(dino.features(reference))
        return dict(clip_t=float(statistics.mean(clip.score(images, captions))),
                    dino=judge.fidelity(dino.features(images), reference_features[0]))
    return score


def write(result: dict, out: Path, grid_prompts: int = 8) -> dict:
    """sweep.json, pareto.png, grid.png and report.html under `out`; returns {name: path}."""
    import json

    from . import report

    out.mkdir(parents=True, exist_ok=True)
    drew = result["images"][0][0] is not None          # a network-only folder is timed without images
    files = dict(json=out / "sweep.json", pareto=out / "pareto.png", **({"grid": out / "grid.png"} if drew else {}),
                 html=out / "report.html")
    public = {k: v for k, v in result.items() if k not in ("images", "jobs", "control_images")}
    report.pareto(result, files["pareto"])
    if drew:
        report.grid(result, files["grid"], grid_prompts)
    report.html(result, files, files["html"])
    files = {k: str(v) for k, v in files.items()}
    report.write_atomic(lambda p: p.write_text(json.dumps({**public, "files": files}, indent=1)), out / "sweep.json")
    return files
