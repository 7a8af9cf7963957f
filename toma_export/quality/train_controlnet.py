"""Training the tiny ControlNets (sdxl-tiny-controlnet, flux-tiny-controlnet) on the shapes world.

Why: a ControlNet that steers nothing cannot show what ToMA costs in control. The control image is the shape's
outline (shapes.outline, an edge map as canny gives) at the sample's random position and size; the caption still
chooses colour and background. Each ControlNet starts from its network as diffusers makes one (`from_unet`,
`from_transformer`: the network's first blocks, zero output layers) and learns with the network's own objective
while the network stays frozen: the loss reaches the ControlNet only through the residuals it adds. FLUX's
ControlNet reads the control image through the VAE (InstantX layout, as FluxControlNetPipeline encodes it); SDXL's
reads the pixels. The judge's control measure (IoU of the drawn shape with the outline's filled region) scores it.
flux-tiny-controlnet then trains ToMA-aware (train's toma_every): on its 16x16 grid an unaware ControlNet loses most
of its control to the network's merge (docs/controlnet.md).

    python -m toma_export.quality.train_controlnet --out toma_export/models/weights   # part of make train-tiny
"""
from __future__ import annotations

import time

import torch

from .. import shapes
from .fitting import progress_bar, update
from .train import EMA, Batches, _optimiser, encode, normalise

# per ControlNet: training steps and samples (each at its network's default size: 128 px, 256 px), and the steps
# and learning rate of the ToMA-aware phase that follows (see train: flux-tiny's 16x16 grid needs it)
DEFAULTS = {"sdxl-tiny-controlnet": dict(steps=800, images=6000, aware_steps=0, aware_lr=0.0, aware_every=2),
            "flux-tiny-controlnet": dict(steps=600, images=2000, aware_steps=300, aware_lr=3e-4, aware_every=2)}


@torch.no_grad()
def control_data(vae, family: str, seed: int, count: int, size: int, quiet: bool = False) -> dict:
    """Raw image latents, the controls as the ControlNet reads them (FLUX: the outline's raw latents; SDXL: its
    pixels, kept as uint8) and the captions of samples 0..count at `size`, drawn 500 at a time."""
    latents, controls, captions = [], [], []
    with progress_bar(count, f"drawing and encoding {count} shapes with outlines at {size} px", quiet) as bar:
        for start in range(0, count, 500):
            x, ctrl, c, _ = shapes.control_batch(seed, start, min(500, count - start), size)
            latents.append(encode(vae, x, quiet=True))
            controls.append(encode(vae, ctrl * 2 - 1, quiet=True) if family == "flux" else
                            (ctrl * 255).round().to(torch.uint8))
            captions.extend(c)
            bar.update(len(c))
    return dict(raw=torch.cat(latents), controls=torch.cat(controls), captions=captions, size=size)


@torch.enable_grad()
def train(pipe, controlnet, family: str, data: dict, seed: int, steps: int, batch: int = 32, lr: float = 1e-3,
          quiet: bool = False, label: str = "", toma_every: int = 0):
    """Train `controlnet` to steer the pipeline's frozen network on `data` (control_data); returns its EMA.

    With `toma_every` n > 0, every n-th batch runs with ToMA at its defaults in network and ControlNet (fresh
    destinations per batch), so the ControlNet also learns residuals that survive the merge: on flux-tiny's 16x16
    grid a 4x4 tile is a sixteenth of the image, and an unaware ControlNet loses most of its control there."""
    from ..toma import apply_toma, remove_toma

    net = pipe.transformer if family == "flux" else pipe.unet
    net.requires_grad_(False)
    latents = normalise(data["raw"], pipe.vae)
    controls = normalise(data["controls"], pipe.vae) if family == "flux" else data["controls"]
    batches = Batches(pipe, family, data["captions"], latents.shape)
    controlnet.train()
    ema = EMA(controlnet)
    opt, sched = _optimiser(controlnet, lr, steps)
    g = torch.Generator().manual_seed(seed)
    with progress_bar(steps, label or f"{family}-tiny-controlnet", quiet) as bar:
        for i in range(steps):
            merged = toma_every > 0 and i % toma_every == toma_every - 1
            if merged:
                for m in (net, controlnet):
                    apply_toma(m)           # a fresh state: no destination carries over from another batch
            step = batches.draw(latents, batch, g)
            text = batches.text(step)
            if family == "flux":
                control = batches.pack(controls[step["pick"]])
                blocks, singles = controlnet(hidden_states=step["xt"], controlnet_cond=control, **text)
                pred = net(hidden_states=step["xt"], controlnet_block_samples=blocks,
                           controlnet_single_block_samples=singles, **text)[0]
            else:
                control = controls[step["pick"]].float() / 255
                down, mid = controlnet(step["xt"], step["t"], controlnet_cond=control, **text)
                pred = net(step["xt"], step["t"], down_block_additional_residuals=down,
                           mid_block_additional_residual=mid, **text)[0]
            loss = batches.loss(pred, step)
            update(opt, sched, loss, bar, i, clip=1.0)
            if merged:
                for m in (net, controlnet):
                    remove_toma(m)
            ema.update(controlnet)
    controlnet.eval()
    return ema.model


@torch.no_grad()
def control_figures(pipe, model: str, count: int = 24, toma: bool = False, steps: int = 28, seed: int | None = None,
                    quiet: bool = False) -> dict:
    """The judge's control measure over `count` held-out samples at the network's default size: each drawn from
    its caption and outline (one seed each), with or without ToMA at its defaults in network and ControlNet.
    Returns the mean IoU and centroid distance (judge.mean_control_scores), the images drawn and the samples."""
    from .. import models
    from ..toma import apply_toma, remove_toma
    from . import judge

    spec = models.get(model)
    network = models.get(spec.base_model)
    size = network.default_size[0]
    seed = judge.CONTROL_SEED if seed is None else seed
    nets = [pipe.transformer if spec.family == "flux" else pipe.unet, pipe.controlnet]
    pipe.set_progress_bar_config(disable=True)
    samples = [shapes.sample(seed, i, size) for i in range(count)]
    images = []
    if toma:
        for net in nets:
            apply_toma(net)
    try:
        with progress_bar(count, f"{model} draws{' (ToMA)' if toma else ''}", quiet) as bar:
            for i, s in enumerate(samples):
                images.append(pipe(s.caption, num_inference_steps=steps, height=size, width=size,
                                   guidance_scale=network.default_guidance, generator=torch.Generator().manual_seed(i),
                                   **network.control_kwargs([s.control()], [1.0]),
                                   **network.pipeline_kwargs()).images[0])
                bar.update()
    finally:
        for net in nets:
            remove_toma(net)
    figures = judge.mean_control_scores(images, [s.mask() for s in samples], [s.caption for s in samples])
    return dict(figures, drawn=images, samples=samples)


def controlnet_pipeline(model: str, vae, stats: dict, weights, controlnet=None):
    """The tiny network's ControlNet pipeline (train.pipeline's parts, the network's `weights`: a safetensors file)
    around `controlnet` (default: the untrained one made from the network)."""
    import diffusers

    from .. import models
    from .train import _load, _weights_into, pipeline

    spec = models.get(model)
    network = models.get(spec.base_model)
    base = pipeline(spec.base_model, vae, stats, _weights_into(network.load(trained=False), _load(weights)))
    controlnet = controlnet if controlnet is not None else spec.from_network(base.transformer if spec.family == "flux"
                                                                               else base.unet)
    parts = {k: v for k, v in base.components.items() if k in ("text_encoder", "text_encoder_2", "tokenizer",
                                                                "tokenizer_2", "vae", "scheduler", network.subfolder)}
    return getattr(diffusers, network.controlnet_pipeline_class)(controlnet=controlnet, **parts)


def train_and_judge(job: dict) -> dict:
    """Train one tiny ControlNet (`job`: model, seed, steps, lr, images, size, vae state, stats, out, threads,
    eval count and steps, quiet), store it, and score its control with and without ToMA."""
    from .. import models
    from .train import _load, save, untrained_vae

    torch.set_num_threads(job["threads"])
    t0 = time.monotonic()
    model = job["model"]
    spec = models.get(model)
    vae = untrained_vae(job["seed"])
    vae.load_state_dict(job["vae"])
    weights = job["out"] / f"{spec.base_model}.safetensors"
    pipe = controlnet_pipeline(model, vae, job["stats"], weights)
    if job["aware_only"]:                                        # the ControlNet in --out, trained
        pipe.controlnet.load_state_dict(_load(job["out"] / f"{model}.safetensors"))
    data = control_data(pipe.vae, spec.family, job["seed"] + 6, job["images"], job["size"], job["quiet"])
    controlnet = pipe.controlnet
    if not job["aware_only"]:
        controlnet = train(pipe, controlnet, spec.family, data, job["seed"] + 7, job["steps"], lr=job["lr"],
                           quiet=job["quiet"], label=model)
    if job["aware_steps"]:
        controlnet = train(pipe, controlnet, spec.family, data, job["seed"] + 8, job["aware_steps"],
                           lr=job["aware_lr"], quiet=job["quiet"], label=f"{model}, ToMA-aware",
                           toma_every=job["aware_every"])
    controlnet.load_state_dict({k: v.half().float() for k, v in controlnet.state_dict().items()})   # as stored
    save(controlnet.state_dict(), job["out"] / f"{model}.safetensors")
    pipe = controlnet_pipeline(model, vae, job["stats"], weights, controlnet)
    figures = {}
    for toma in (False, True):
        found = control_figures(pipe, model, job["eval_count"], toma, job["eval_steps"], quiet=job["quiet"])
        figures["toma" if toma else "baseline"] = {k: found[k] for k in ("iou", "centroid", "images", "missing")}
    return dict(steps=job["steps"], lr=job["lr"], size=job["size"], images=job["images"],
                aware_steps=job["aware_steps"], aware_lr=job["aware_lr"], aware_every=job["aware_every"],
                aware_only=job["aware_only"],
                minutes=(time.monotonic() - t0) / 60, control=figures, threads=job["threads"])


def main(argv=None) -> int:
    import argparse
    import json
    from pathlib import Path

    from ..families import tiny
    from .train import default_threads

    p = argparse.ArgumentParser(prog="python -m toma_export.quality.train_controlnet",
                                description="Train the tiny ControlNets against the tiny networks and VAE in --out "
                                            "(make train-tiny runs it after them).")
    p.add_argument("--out", type=Path, default=tiny.WEIGHTS, help="folder of the weights (the package's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["sdxl-tiny-controlnet", "flux-tiny-controlnet"])
    p.add_argument("--steps", type=int, help="training steps (sdxl-tiny-controlnet 800, flux-tiny-controlnet 600)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--images", type=int, help="training samples (sdxl-tiny-controlnet 6000, flux-tiny-controlnet 2000)")
    p.add_argument("--aware-steps", type=int, help="steps of the ToMA-aware phase that follows, ToMA in every other "
                                                    "batch (flux-tiny-controlnet 300, sdxl-tiny-controlnet 0: none)")
    p.add_argument("--aware-every", type=int, help="the ToMA-aware phase merges every N-th batch (2)")
    p.add_argument("--aware-only", action="store_true",
                   help="skip the first phase: start from the trained ControlNet in --out (how the shipped "
                        "flux-tiny-controlnet got its ToMA-aware phase)")
    p.add_argument("--eval-count", type=int, default=24, help="held-out samples the control figures are drawn for")
    p.add_argument("--eval-steps", type=int, default=28)
    p.add_argument("--threads", type=int, help="torch threads (OMP_NUM_THREADS, else every core)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    threads = args.threads or default_threads()
    from safetensors import safe_open

    from .. import models
    from .train import _load

    with safe_open(str(args.out / "vae-tiny.safetensors"), "pt") as f:
        stats = json.loads(f.metadata()["latents"])
    vae = _load(args.out / "vae-tiny.safetensors")
    # one after the other on every thread: the weights do not depend on whether the other one trains
    names = [args.only] if args.only else list(DEFAULTS)
    if args.aware_only:
        names = [n for n in names if (DEFAULTS[n]["aware_steps"] if args.aware_steps is None else args.aware_steps)]
        if not names:
            p.error("--aware-only: no ControlNet to train, as its ToMA-aware phase has 0 steps; give --aware-steps N")
    jobs = [dict(model=name, seed=args.seed, steps=args.steps or DEFAULTS[name]["steps"], lr=args.lr,
                 images=args.images or DEFAULTS[name]["images"], aware_only=args.aware_only,
                 aware_steps=DEFAULTS[name]["aware_steps"] if args.aware_steps is None else args.aware_steps,
                 aware_lr=DEFAULTS[name]["aware_lr"] or args.lr,
                 aware_every=args.aware_every or DEFAULTS[name]["aware_every"],
                 size=models.get(models.get(name).base_model).default_size[0], vae=vae, stats=stats, out=args.out,
                 threads=threads, eval_count=args.eval_count, eval_steps=args.eval_steps, quiet=args.quiet)
            for name in names]
    results = [train_and_judge(job) for job in jobs]
    record_path = args.out / "training.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    from ..bench.run import cpu_name

    for job, result in zip(jobs, results):
        record[job["model"]] = dict(result, machine=cpu_name(), seed=args.seed)
        c = result["control"]
        side = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731   (None: no image showed a shape)
        print(f"{job['model']}: IoU {c['baseline']['iou']:.3f} without ToMA, {c['toma']['iou']:.3f} with ToMA at its "
              f"defaults; centroid {side(c['baseline']['centroid'])} / {side(c['toma']['centroid'])} of the side "
              f"({c['baseline']['images']} held-out samples; {result['minutes']:.1f} min)", flush=True)
    from .report import write_atomic

    write_atomic(lambda p: p.write_text(json.dumps(record, indent=1)), record_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
