"""The reference record: what the fp32 PyTorch reference computes at one size (inputs, outputs, the features
each group selected on, and a denoising loop's latents and destinations), and its .npz form, so that it can
be made on one machine and compared on another."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..errors import ArtifactError
from ..onnx import ToMAGraph
from ..onnx.graph import RECOMPUTE, dst_input
from ..toma import ToMAConfig
from ..toma.selection import recompute_flag
from .runners import TorchRunner

RECORD_FORMAT = 2          # 2: the full ToMA configuration in the record's metadata


def sample_feeds(spec, graph: ToMAGraph, batch: int, size) -> dict:
    net = spec.graph_inputs(batch=batch, height=size[0], width=size[1], smooth=True)
    toma = graph.sample_toma_inputs(net, recompute=True)
    return {n: t.numpy() for n, t in zip(graph.input_names, [*net.values(), *toma.values()])}


def cast_feeds(feeds: dict, dtype: str | None, runner) -> dict:
    """Float inputs in the candidate's dtype (the ONNX file's); torch runners cast for themselves."""
    if dtype == "fp16" and not isinstance(runner, TorchRunner):
        return {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
    return feeds


def make_record(spec, ref_runner, config, options, size) -> dict:
    """Everything the candidates are compared against at one size, computed by the fp32 reference."""
    feeds = sample_feeds(spec, ref_runner.graph, options.batch, size)
    step = dict(ref_runner.infer(feeds, check_inputs=False))
    record = dict(feeds=feeds, step=step,
                  tiles={g: t.detach().cpu().numpy() for g, t in ref_runner.graph.last_tiles.items()})
    if options.steps:
        record["latents"], record["used"] = run_loop(spec, ref_runner, feeds, options.steps, config, "fp32")
    return record


def forced_feeds(feeds: dict, outputs: dict) -> dict:
    """Inputs that make a graph reuse the destinations in `outputs` instead of selecting."""
    forced = dict(feeds)
    forced.update({dst_input(n[len("toma_dst_out."):]): np.asarray(v) for n, v in outputs.items()
                   if n.startswith("toma_dst_out.")})
    if RECOMPUTE in forced:
        forced[RECOMPUTE] = recompute_flag(False).numpy()
    return forced


def run_loop(spec, runner, feeds: dict, steps: int, config: ToMAConfig | None, dtype: str,
             forced: list | None = None):
    """A denoising loop on one runner: the latents after every step and the destinations each step used.
    Every step runs the ToMA graph, refreshing destinations by the config's rule; with `forced`, step i
    reuses forced[i] instead of selecting."""
    every_step = replace(config, merge_steps=None) if config else None
    scheduler = spec.scheduler()
    scheduler.set_timesteps(steps)
    latent = torch.as_tensor(feeds[spec.latent_input]).float() * getattr(scheduler, "init_noise_sigma", 1.0)
    state = {k: torch.as_tensor(v) for k, v in feeds.items()}
    dst = {k: v for k, v in state.items() if k.startswith("toma_dst.")}
    latents, used = [], []
    for i, t in enumerate(scheduler.timesteps):
        feed = spec.step_inputs(state, scheduler, latent, t)
        if RECOMPUTE in feed:
            feed.update({k: torch.as_tensor(v) for k, v in forced[i].items()} if forced else dst)
            feed[RECOMPUTE] = recompute_flag(forced is None and (every_step is None or every_step.refreshes_at(i)))
        out = runner.infer(cast_feeds({k: v.numpy() for k, v in feed.items()}, dtype, runner), check_inputs=False)
        names = list(out)
        noise = torch.as_tensor(np.asarray(out[names[0]], dtype=np.float32)).reshape(latent.shape)
        dst = {dst_input(n[len("toma_dst_out."):]): torch.as_tensor(np.asarray(out[n])) for n in names[1:]}
        used.append({k: v.numpy() for k, v in dst.items()})
        latent = scheduler.step(noise, t, latent).prev_sample
        latents.append(latent.numpy().copy())
    return latents, used


def save_records(path, records: list, meta: dict) -> None:
    """Reference records as one .npz (written under a temporary name, then renamed)."""
    flat = {"meta": np.array(json.dumps(meta))}
    for i, rec in enumerate(records):
        for part in ("feeds", "step", "tiles"):
            flat.update({f"{i}/{part}/{k}": np.asarray(v) for k, v in rec[part].items()})
        for s, latent in enumerate(rec.get("latents", [])):
            flat[f"{i}/latents/{s}"] = latent
            flat.update({f"{i}/used/{s}/{k}": v for k, v in rec["used"][s].items()})
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **flat)
    tmp.replace(path)


def load_records(path) -> dict:
    try:
        data = np.load(path, allow_pickle=False)
        meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError) as err:
        raise ArtifactError(f"{path} is not a toma-export reference file ({err}); make one with --save-reference") from None
    if meta.get("format") != RECORD_FORMAT:
        raise ArtifactError(f"{path} has reference format {meta.get('format')}, this toolkit reads {RECORD_FORMAT}; "
                            "save the reference again with this version")
    records = []
    for i in range(len(meta["sizes"])):
        rec = {part: {} for part in ("feeds", "step", "tiles")}
        rec["latents"], rec["used"] = [None] * meta["steps"], [dict() for _ in range(meta["steps"])]
        for key in data.files:
            head, _, rest = key.partition("/")
            if head != str(i):
                continue
            part, _, name = rest.partition("/")
            if part in rec and part not in ("latents", "used"):
                rec[part][name] = data[key]
            elif part == "latents":
                rec["latents"][int(name)] = data[key]
            elif part == "used":
                s, _, tensor = name.partition("/")
                rec["used"][int(s)][tensor] = data[key]
        rec["step"] = {k: rec["step"][k] for k in sorted(rec["step"], key=lambda n: n.startswith("toma_dst_out."))}
        records.append(rec)
    return dict(meta=meta, records=records)
