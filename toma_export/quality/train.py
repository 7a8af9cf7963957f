"""Training the tiny models on the shapes world (`make train-tiny`): a VAE, flux-tiny, sdxl-tiny and the judge.

Why: the tiny models must draw something a judge can check, so that ToMA's cost in quality can be measured.
Each network keeps its architecture and learns with its family's objective, in the latent space of a small VAE
trained first (flux-tiny in two phases, as real FLUX trains at rising resolution: 128 px, then 256 px, its
default): flow matching (FlowMatchEulerDiscreteScheduler's sigmas, velocity noise - x0) for FLUX,
epsilon prediction on the SDXL scheduler's betas (min-SNR weighted) for SDXL, with captions dropped to zeros
one time in ten so SDXL's classifier-free guidance has an unconditional model. Text goes through the pipelines'
own frozen random text encoders (`encode_prompt`), computed once per caption. Everything follows from the seed.
"""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F

from .. import shapes
from . import fitting
from .fitting import images, progress_bar, update

OFFSET_NOISE = 0.3       # SDXL: per-channel noise offset, several times the 16x16 latent's own mean noise
MIN_SNR = 5.0            # SDXL: min-SNR-gamma loss weighting (Hang et al. 2023); with lr 2e-3 it learns shapes
SIZE = 128               # the VAE's and sdxl-tiny's size, and flux-tiny's first phase: 64 FLUX tokens (8x8)
FLUX_LR_256 = 3e-3       # flux-tiny's second phase (1e-3 drew the same unmerged, 6 points worse with ToMA)


class EMA:
    """Exponential moving average of a network's weights, with the usual warm-up of its decay."""

    def __init__(self, model, decay: float = 0.999):
        self.model, self.decay, self.count = copy.deepcopy(model).eval(), decay, 0

    @torch.no_grad()
    def update(self, model):
        self.count += 1
        d = min(self.decay, (1 + self.count) / (10 + self.count))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.mul_(d).add_(p.detach(), alpha=1 - d)


def _optimiser(model, lr: float, steps: int):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))))
    return opt, sched


@torch.enable_grad()
def train_vae(vae, seed: int, steps: int, batch: int = 16, quiet: bool = False) -> dict:
    """An autoencoder with a tiny KL term: it needs to reconstruct flat shapes, and the denoisers want a smooth
    latent space. Returns the latents' {"mean", "std"} (one scalar each), from which each family's pipeline
    factors follow (families/tiny.py vae)."""
    x, _, _ = images(seed, steps * batch // 4, SIZE, quiet)      # each image seen about four times
    vae.train()
    opt, sched = _optimiser(vae, 2e-3, steps)
    g = torch.Generator().manual_seed(seed)
    with progress_bar(steps, "VAE", quiet) as bar:
        for i in range(steps):
            target = x[torch.randint(0, len(x), (batch,), generator=g)]
            posterior = vae.encode(target).latent_dist
            recon = vae.decode(posterior.sample(g)).sample
            # the shape is a small share of the pixels: weight it up, or colour is learnt long after the background
            weight = 1 + 9 * ((target - target[..., :1, :1]).abs().sum(1, keepdim=True) > 0.1).float()
            error = recon - target
            loss = (weight * (error.abs() + error.square())).mean() / weight.mean() + 1e-6 * posterior.kl().mean()
            update(opt, sched, loss, bar, i)
    vae.eval()
    z = encode(vae, x[:1024], quiet=True)
    return dict(mean=float(z.mean()), std=float(z.std()), channel_mean=z.mean((0, 2, 3)).tolist(),
                channel_std=z.std((0, 2, 3)).tolist())


@torch.no_grad()
def encode(vae, x: torch.Tensor, quiet: bool = False) -> torch.Tensor:
    """Images -> raw latents (the posterior means)."""
    out = []
    with progress_bar(len(x), "encoding latents", quiet) as bar:
        for i in range(0, len(x), 128):
            out.append(vae.encode(x[i:i + 128]).latent_dist.mean)
            bar.update(len(out[-1]))
    return torch.cat(out)


@torch.no_grad()
def encoded_images(vae, seed: int, count: int, size: int, quiet: bool = False):
    """Raw latents and captions of images 0..count of the shapes world at `size`, drawn and encoded 1,000 at a
    time: 12,000 images at 256 px are 9 GB of pixels but 200 MB of latents."""
    from .. import shapes

    out, captions = [], []
    with progress_bar(count, f"drawing and encoding {count} shapes at {size} px", quiet) as bar:
        for start in range(0, count, 1000):
            x, c, _ = shapes.batch(seed, start, min(1000, count - start), size)
            out.append(encode(vae, x, quiet=True)), captions.extend(c)
            bar.update(len(c))
    return torch.cat(out), captions


def normalise(raw: torch.Tensor, vae) -> torch.Tensor:
    """Raw latents as the pipeline's network sees them, the inverse of its decoding: FLUX (x - shift) * scale,
    SDXL (x - mean_c) * scale / std_c per channel."""
    c = vae.config
    if getattr(c, "latents_mean", None) is not None:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (c.latents_mean, c.latents_std))
        return (raw - mean) * c.scaling_factor / std
    return (raw - (c.shift_factor or 0.0)) * c.scaling_factor


def _texts(pipe, family: str) -> dict:
    """{caption or "": conditioning tensors} through the pipeline's own encode_prompt; "" is the unconditional
    (SDXL's pipeline uses zeros for an empty negative prompt)."""
    out = {}
    with torch.no_grad():
        for text in shapes.grammar():
            if family == "flux":
                length = pipe.tokenizer_2.model_max_length
                embeds, pooled, _ = pipe.encode_prompt(text, None, max_sequence_length=length)
            else:
                embeds, _, pooled, _ = pipe.encode_prompt(text, do_classifier_free_guidance=False)
            out[text] = (embeds[0], pooled[0])
    e, p = out[shapes.grammar()[0]]
    out[""] = (torch.zeros_like(e), torch.zeros_like(p))
    return out


class Batches:
    """What one training step of a network of the family draws: the conditioning of every caption (computed once)
    and, per step, the noised latents, in the order the random draws were always made (so a seed trains the same
    weights); the ControlNet trainer (train_controlnet.py) steps through the same draws."""

    def __init__(self, pipe, family: str, captions: list, shape):
        texts = _texts(pipe, family)
        self.family = family
        self.embeds = torch.stack([texts[c][0] for c in captions] + [texts[""][0]])
        self.pooled = torch.stack([texts[c][1] for c in captions] + [texts[""][1]])
        self.empty = len(captions)
        self.shape = b, c, h, w = shape
        if family == "flux":
            from diffusers import FluxPipeline

            self.pack_latents = FluxPipeline._pack_latents
            self.img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
            self.txt_ids = torch.zeros(self.embeds.shape[1], 3)
        else:
            self.alphas = torch.cumprod(1 - pipe.scheduler.betas, 0)
            size = h * pipe.vae_scale_factor
            self.time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = self.shape
        return self.pack_latents(x, len(x), c, h, w)

    def draw(self, latents: torch.Tensor, batch: int, g: torch.Generator) -> dict:
        """pick (the samples), cond (their captions' rows, SDXL's dropped to the empty one in ten), x0, noise, xt
        (FLUX: packed) and sigma (FLUX) or t and a (SDXL's step and its alpha-bar)."""
        pick = torch.randint(0, self.shape[0], (batch,), generator=g)
        x0 = latents[pick]
        cond = torch.where(torch.rand(batch, generator=g) < 0.1, self.empty, pick) if self.family == "sdxl" else pick
        noise = torch.randn(x0.shape, generator=g)
        if self.family == "flux":
            sigma = torch.sigmoid(torch.randn(batch, generator=g))
            s = sigma.view(-1, 1, 1, 1)
            return dict(pick=pick, cond=cond, x0=x0, noise=noise, sigma=sigma, xt=self.pack((1 - s) * x0 + s * noise))
        # offset noise: the schedule leaves 9 % of the image in its first step's input, so without it the model
        # reads the background off the input's mean (zero at inference) instead of the text
        noise = noise + OFFSET_NOISE * torch.randn(batch, self.shape[1], 1, 1, generator=g)
        t = torch.randint(0, len(self.alphas), (batch,), generator=g)
        a = self.alphas[t].view(-1, 1, 1, 1)
        return dict(pick=pick, cond=cond, x0=x0, noise=noise, t=t, a=a, xt=a.sqrt() * x0 + (1 - a).sqrt() * noise)

    def text(self, step: dict) -> dict:
        """The network's conditioning arguments for a step's samples (besides the latent)."""
        cond, batch = step["cond"], len(step["cond"])
        if self.family == "flux":
            return dict(encoder_hidden_states=self.embeds[cond], pooled_projections=self.pooled[cond],
                        timestep=step["sigma"], img_ids=self.img_ids, txt_ids=self.txt_ids, return_dict=False)
        return dict(encoder_hidden_states=self.embeds[cond], return_dict=False,
                    added_cond_kwargs=dict(text_embeds=self.pooled[cond], time_ids=self.time_ids.expand(batch, -1)))

    def loss(self, pred: torch.Tensor, step: dict) -> torch.Tensor:
        """FLUX: flow matching (velocity noise - x0); SDXL: epsilon, min-SNR weighted (nearly clean steps no longer
        outweigh the noisy ones that place shapes)."""
        if self.family == "flux":
            return F.mse_loss(pred, self.pack(step["noise"] - step["x0"]))
        snr = step["a"] / (1 - step["a"])
        weight = snr.clamp(max=MIN_SNR) / snr
        return (weight * (pred - step["noise"]).square()).mean() / weight.mean()


@torch.enable_grad()
def train_network(pipe, family: str, latents: torch.Tensor, captions: list, seed: int, steps: int, batch: int = 32,
                  lr: float = 5e-4, quiet: bool = False):
    """Train the pipeline's network on (latent, caption) pairs with its family's objective; returns its EMA."""
    net = pipe.transformer if family == "flux" else pipe.unet
    batches = Batches(pipe, family, captions, latents.shape)
    net.train()
    ema = EMA(net)
    opt, sched = _optimiser(net, lr, steps)
    g = torch.Generator().manual_seed(seed)
    with progress_bar(steps, family + "-tiny", quiet) as bar:
        for i in range(steps):
            step = batches.draw(latents, batch, g)
            if family == "flux":
                pred = net(hidden_states=step["xt"], **batches.text(step))[0]
            else:
                pred = net(step["xt"], step["t"], **batches.text(step))[0]
            update(opt, sched, batches.loss(pred, step), bar, i, clip=1.0)
            ema.update(net)
    net.eval()
    return ema.model


def pipeline(model: str, vae, stats: dict, net=None):
    """The tiny model's diffusers pipeline around a copy of `vae` with the family's factors for latents of these
    `stats`, and `net` (default: its random init); the frozen text encoders are rebuilt from tiny.ENCODER_SEED."""
    import diffusers

    from .. import models
    from ..families import tiny

    spec = models.get(model)
    family_vae = copy.deepcopy(vae)
    family_vae.register_to_config(**tiny.factors(stats, spec.family))
    net = net if net is not None else spec.load(trained=False)
    parts = {**spec.tiny_parts(), "vae": family_vae, spec.subfolder: net}
    return getattr(diffusers, spec.pipeline_class)(scheduler=spec.scheduler(), **parts)


@torch.no_grad()
def draws(pipe, model: str, seeds: int = 1, toma: bool = False, steps: int = 28, quiet: bool = False):
    """One image per caption of the grammar and seed at the model's default size and `steps`, with or without
    ToMA at its default settings: what the judge scores after training."""
    from .. import models
    from ..toma import apply_toma, remove_toma

    spec = models.get(model)
    net = pipe.transformer if spec.family == "flux" else pipe.unet
    pipe.set_progress_bar_config(disable=True)            # one bar for all draws
    if toma:
        apply_toma(net)
    captions = [c for c in shapes.grammar() for _ in range(seeds)]
    out = []
    try:
        with progress_bar(len(captions), f"{model} draws{' (ToMA)' if toma else ''}", quiet) as bar:
            for i, text in enumerate(captions):
                height, width = spec.default_size
                out.append(pipe(text, num_inference_steps=steps, height=height, width=width,
                                guidance_scale=spec.default_guidance,
                                generator=torch.Generator().manual_seed(i % seeds), **spec.pipeline_kwargs()).images[0])
                bar.update()
    finally:
        remove_toma(net)
    return out, captions


def save(tensors: dict, path, metadata: dict | None = None, half: bool = True) -> None:
    """safetensors written beside the final name and renamed: nothing half-written under it."""
    from safetensors.torch import save_file

    from .report import write_atomic

    stored = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    write_atomic(lambda p: save_file(stored, str(p), metadata=metadata), path)


def main(argv=None) -> int:
    import argparse
    from pathlib import Path

    from ..families import tiny

    p = argparse.ArgumentParser(prog="python -m toma_export.quality.train",
                                description="Train the tiny models' VAE, flux-tiny, sdxl-tiny and the shapes judge "
                                            "(make train-tiny), from a seed, on this machine's CPUs.")
    p.add_argument("--out", type=Path, default=tiny.WEIGHTS, help="folder for the weights (the package's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=24000, help="training images of the networks (24000)")
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--flux-steps", type=int, default=4000)
    p.add_argument("--sdxl-steps", type=int, default=2000)
    p.add_argument("--flux-lr", type=float, default=3e-3)
    p.add_argument("--flux-steps-256", type=int, default=2000, help="flux-tiny's second phase, at 256 px (2000)")
    p.add_argument("--flux-lr-256", type=float, default=FLUX_LR_256)
    p.add_argument("--images-256", type=int, default=12000, help="training images of flux-tiny's 256-px phase")
    p.add_argument("--flux-start", type=Path,
                   help="flux-tiny weights at 128 px (a safetensors file) to start the 256-px phase from, instead "
                        "of training the first phase")
    p.add_argument("--sdxl-lr", type=float, default=2e-3)
    p.add_argument("--judge-steps", type=int, default=2000)
    p.add_argument("--eval-seeds", type=int, default=2, help="seeds per caption for the final judge figures (2)")
    p.add_argument("--eval-steps", type=int, default=28, help="denoising steps of the final draws (generate's 28)")
    p.add_argument("--only", choices=["flux-tiny", "sdxl-tiny"],
                   help="train this network again against the judge and VAE already in --out")
    p.add_argument("--threads", type=int,
                   help="torch threads (OMP_NUM_THREADS, else every core); the networks each take half, and train "
                        "at the same time in two processes unless --only")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = default_threads()
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _train(args)
    finally:
        torch.set_num_threads(previous)          # the caller's process (a test worker) keeps its own setting


def default_threads() -> int:
    """OMP_NUM_THREADS where it is a number, else every core: what torch itself would take."""
    import os

    omp = os.environ.get("OMP_NUM_THREADS", "")
    return int(omp) if omp.isdigit() else os.cpu_count() or 1


def _train(args) -> int:
    import json

    from ..bench.run import cpu_name
    from . import judge as judge_module

    args.out.mkdir(parents=True, exist_ok=True)
    start, record = time.monotonic(), dict(seed=args.seed, machine=cpu_name(), threads=torch.get_num_threads(),
                                           torch=torch.__version__)
    quiet = args.quiet

    torch.manual_seed(args.seed)
    vae = untrained_vae(args.seed)
    if args.only:
        from safetensors import safe_open

        vae.load_state_dict(_load(args.out / "vae-tiny.safetensors"))
        with safe_open(str(args.out / "vae-tiny.safetensors"), "pt") as f:
            stats = json.loads(f.metadata()["latents"])
        record = {**json.loads((args.out / "training.json").read_text()), **record}
    else:
        judge = judge_module.train(args.seed + 1, steps=args.judge_steps, quiet=quiet)
        record["judge"] = dict(steps=args.judge_steps, held_out=judge_module.held_out_accuracy(judge))
        save(judge.state_dict(), args.out / "judge.safetensors", half=False)
        print(f"judge: held-out accuracy {record['judge']['held_out']['all']:.2%} ({elapsed(start)})", flush=True)
        stats = train_vae(vae, args.seed + 2, args.vae_steps, quiet=quiet)
        save(vae.state_dict(), args.out / "vae-tiny.safetensors", metadata=dict(latents=json.dumps(stats)),
             half=False)
        record["vae"] = dict(steps=args.vae_steps, latents=stats)
        print(f"vae: latents mean {stats['mean']:.3f} std {stats['std']:.3f} ({elapsed(start)})", flush=True)

    flux, sdxl = args.only != "sdxl-tiny", args.only != "flux-tiny"
    if flux and args.flux_start is not None and not args.flux_start.is_file():
        raise SystemExit(f"--flux-start {args.flux_start}: no such file; give flux-tiny weights at 128 px "
                         "(a .safetensors file) or leave it out to train the first phase")
    if sdxl or args.flux_start is None:          # the 128-px images: sdxl-tiny's, and flux-tiny's first phase
        x, captions, _ = images(args.seed + 4, args.images, SIZE, quiet)
        small = dict(size=SIZE, raw=encode(vae, x, quiet=quiet), captions=captions)
        del x
    if flux:
        # on every thread before the networks split them: the same world as the first phase, at the second phase's
        # size, flux-tiny's default (256 px: 16x16 tokens)
        from .. import models

        size = models.get("flux-tiny").default_size[0]
        raw, captions_256 = encoded_images(vae, args.seed + 4, args.images_256, size, quiet)
        large = dict(size=size, raw=raw, captions=captions_256)
    # Each network trains on half the threads, alone (--only) or beside the other, so its weights are the same
    # either way. Together they take about three quarters of the time of one after the other on every thread:
    # a step on two threads is only 1.5x as fast as on one (Intel Xeon), and two processes barely slow each other.
    threads, together = max(1, args.threads // 2), not args.only and args.threads > 1
    networks = []
    if flux:
        first = [] if args.flux_start else [dict(small, steps=args.flux_steps, lr=args.flux_lr)]
        networks.append(("flux-tiny", "flux", first + [dict(large, steps=args.flux_steps_256, lr=args.flux_lr_256)]))
    if sdxl:
        networks.append(("sdxl-tiny", "sdxl", [dict(small, steps=args.sdxl_steps, lr=args.sdxl_lr)]))
    jobs = [dict(model=model, family=family, phases=phases, seed=args.seed, vae=vae.state_dict(), stats=stats,
                 start=args.flux_start if family == "flux" else None, out=args.out, threads=threads,
                 eval_seeds=args.eval_seeds, eval_steps=args.eval_steps, quiet=quiet, row=row if together else 0)
            for row, (model, family, phases) in enumerate(networks)]
    if together:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(len(jobs), mp_context=torch.multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(train_and_judge, jobs))
    else:
        results = [train_and_judge(job) for job in jobs]
    for job, result in zip(jobs, results):
        record[job["model"]] = result
        figures = result["prompt_accuracy"]
        print(f"{job['model']}: prompt accuracy {figures['baseline']:.1%} without ToMA, {figures['toma']:.1%} with "
              f"ToMA at its defaults ({result['draws']} draws each, judged; {result['minutes']:.1f} min on "
              f"{result['threads']} thread(s); {elapsed(start)})", flush=True)
    record["minutes" if not args.only else f"minutes ({args.only} alone)"] = (time.monotonic() - start) / 60
    (args.out / "training.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))
    return 0


def train_and_judge(job: dict) -> dict:
    """Train one network (`job` from _train), store it, and judge its draws with and without ToMA: run in a
    process of its own when both networks train at once, so it takes everything as plain tensors."""
    from .. import models
    from . import judge as judge_module

    fitting.BAR_ROW = job["row"]
    torch.set_num_threads(job["threads"])
    model, family = job["model"], job["family"]
    vae = untrained_vae(job["seed"])
    vae.load_state_dict(job["vae"])
    judge = judge_module.load(job["out"] / "judge.safetensors")     # written in full precision before the jobs
    t0, start = time.monotonic(), job["start"]
    net = None if start is None else _weights_into(models.get(model).load(trained=False), _load(start))
    phases = []
    for phase in job["phases"]:     # flux-tiny: 128 px, then 256 px from the first phase's weights as stored
        began = time.monotonic()
        pipe = pipeline(model, vae, job["stats"], net)
        net = train_network(pipe, family, normalise(phase["raw"], pipe.vae), phase["captions"], job["seed"] + 5,
                            phase["steps"], lr=phase["lr"], quiet=job["quiet"])
        net = _weights_into(net, {k: v.half() for k, v in net.state_dict().items()})
        phases.append(dict(size=phase["size"], steps=phase["steps"], lr=phase["lr"], images=len(phase["captions"]),
                           minutes=(time.monotonic() - began) / 60))
    path = job["out"] / f"{model}.safetensors"
    save(net.state_dict(), path)
    pipe = pipeline(model, vae, job["stats"], net)        # judged as stored: fp16-rounded
    figures = {}
    for toma in (False, True):
        drawn, texts = draws(pipe, model, job["eval_seeds"], toma, job["eval_steps"], job["quiet"])
        figures["toma" if toma else "baseline"] = judge_module.prompt_accuracy(judge, drawn, texts)
    return dict(phases=phases, start=str(start) if start else None, minutes=(time.monotonic() - t0) / 60,
                prompt_accuracy=figures, threads=job["threads"], draws=len(texts))


def _weights_into(net, state: dict):
    """`net` holding `state` in fp32 (stored weights are fp16)."""
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net


def untrained_vae(seed: int):
    """The tiny models' VAE as `make train-tiny` starts it (4 latent channels), in this process or a spawned one."""
    from ..families import tiny

    return tiny.vae(4, seed + 3, "flux", trained=False)


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def elapsed(start: float) -> str:
    return f"{time.monotonic() - start:.0f} s"


if __name__ == "__main__":
    raise SystemExit(main())
