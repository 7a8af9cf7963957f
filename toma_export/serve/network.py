"""ServedNetwork: an exported graph or engine standing in for `pipe.transformer` / `pipe.unet`.

Why a module and not a callback: diffusers pipelines read their network as a model (config, dtype,
device, `cache_context`, `return_dict`), so the drop-in is a parameter-free torch module that answers
those and turns each call into the graph's input layout (the family's served_call), checks the shapes
against what the artifact covers, runs the ToMA graph or, on steps the schedule leaves unmerged, the
baseline graph, and carries the destinations between steps (schedule.py). Weights live in the runtime.

A network split for First-Block Cache (a tail export that names its head) runs the head every step, and the tail
only where toma_export.cache's rule says so; a cached step returns the head's own prediction from the last
computed tail residual. A skipped step runs no ToMA: its step still counts on the schedule's clock, and the next
computed step recomputes destinations where its own step index says so, else reuses those of the last computed
step, as the PyTorch patch does.
"""
from __future__ import annotations

import contextlib
import inspect
import time
from pathlib import Path

import torch

from .. import models
from ..artifacts import Artifact
from ..errors import ArtifactError, UsageError
from ..families import read_config
from ..onnx.graph import call_grid, dst_shapes
from .schedule import DestinationSchedule


def network_config(spec) -> dict:
    """The diffusers config of the network a spec names, without loading weights: config.json of a local
    folder or the hub cache for real models, the constructor's defaults plus the spec's config otherwise."""
    from diffusers.configuration_utils import FrozenDict

    cls = spec.model_cls
    config = None
    if spec.source is not None:
        config = read_config(Path(spec.source).expanduser(), spec.subfolder)
        if config is None:
            try:
                config = dict(cls.load_config(spec.source, subfolder=spec.subfolder))
            except (OSError, ValueError):
                config = None
    if config is None:
        params = inspect.signature(cls.__init__).parameters.values()
        config = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        config.update(spec.config)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["_class_name"] = cls.__name__
    return FrozenDict(config)


class ServedNetwork(torch.nn.Module):
    """pipe.transformer / pipe.unet for any family; build one with `load_network`."""

    def __init__(self, artifact: Artifact, baseline: Artifact | None = None, share_weights: bool = True,
                 cuda_graphs: bool = True, schedule=None, cache=None):
        super().__init__()
        from ..cache import FirstBlockCache

        self.head_artifact = head_of(artifact, cache)
        self.cache = FirstBlockCache(cache) if cache is not None else None
        toma = artifact if artifact.config is not None else None
        baseline = baseline or (artifact if toma is None else None)
        self.toma_artifact, self.baseline_artifact = toma, baseline
        self.spec = models.get(artifact.model).with_text_len(   # a static graph fixes its text length
            None if artifact.meta["dynamic"] else artifact.meta.get("text_len")).with_control(
            tuple(artifact.meta.get("control") or ()))
        config = _schedule(toma, schedule) if toma else None
        self.schedule = DestinationSchedule(config, toma.groups if toma else [])
        if toma is not None and self.schedule.has_unmerged_steps and baseline is None:
            raise UsageError(f"{toma.name}: the ToMA schedule merge_steps={config.merge_steps!r} leaves steps "
                             "unmerged, which need the baseline export of the same model (toma-export export "
                             "--no-toma, or generate without --onnx/--engine) passed as baseline=")
        if self.head_artifact is not None and self.schedule.has_unmerged_steps and toma is not None:
            raise UsageError(f"{toma.name}: a First-Block Cache split runs with a ToMA schedule that merges every "
                             f"step; drop --merge-steps {config.merge_steps!r} (or pass --cache none with an unsplit "
                             "export)")
        if baseline is not None and toma is not None:
            _check_pair(toma, baseline)
        self.kind = artifact.kind
        self.sharing = None
        if self.kind == "onnx":
            from ..runtime.onnxruntime import OrtRunner, load_session, open_pair, session_options

            self.toma_runner, self.baseline_runner, self.sharing = open_pair(
                toma.path if toma else None, baseline.path if baseline else None, share=share_weights)
            self.head_runner = (OrtRunner(load_session(self.head_artifact.path, session_options()))
                                if self.head_artifact else None)
            self._device = torch.device("cpu")
        else:
            from ..runtime.tensorrt import BufferedEngineRunner

            self.toma_runner = BufferedEngineRunner(toma.path, cuda_graphs) if toma else None
            self.baseline_runner = BufferedEngineRunner(baseline.path, cuda_graphs) if baseline else None
            self.head_runner = (BufferedEngineRunner(self.head_artifact.path, cuda_graphs) if self.head_artifact
                                else None)
            self._device = torch.device("cuda")
        self.config = network_config(self.spec)
        # a parameter-free module has no device nor dtype for diffusers to find; wrappers that look (several
        # ControlNets in one MultiControlNetModel) find them on this empty buffer
        self.register_buffer("where", torch.empty(0, dtype=self.dtype, device=self._device), persistent=False)
        for name, value in self.spec.network_attributes(self.config).items():
            setattr(self, name, value)
        self.calls = {"toma": 0, "baseline": 0, "recompute": 0, "cached": 0}
        self.timings: list[tuple[int, float]] = []      # (step, seconds) per call

    # -- what pipelines read off a diffusers model --
    @property
    def __class__(self):
        """diffusers' ControlNet pipelines branch on their ControlNet's class (one or several, VAE-encoded control or
        not): a served ControlNet answers as the diffusers class it stands in for; a network as itself."""
        spec = self.__dict__.get("spec")
        return spec.model_cls if spec is not None and spec.residual_layout() else type(self)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return (self.toma_artifact or self.baseline_artifact).dtype

    @property
    def provider(self) -> str:
        return (self.toma_runner or self.baseline_runner).provider

    def to(self, *args, **kwargs):
        """Weights live in the runtime: moving or casting the pipeline leaves this network where it is."""
        return self

    def cache_context(self, name: str):
        return contextlib.nullcontext()

    def reset(self) -> None:
        """Start the next call at step 0 with no destinations nor cached residuals (a new generation is detected
        by itself)."""
        self.schedule.reset()
        if self.cache is not None:
            self.cache.reset()

    # -- one call --
    def forward(self, *args, **kwargs):
        """The diffusers model's call: the family maps it to graph inputs and the result back."""
        net, timestep, pixels, finish = self.spec.served_call(self.config, *args, **kwargs)
        out = self.run_graph(net, timestep, pixels)
        return finish(out if self.spec.residual_layout() else out[self.spec.output_name])

    def run_graph(self, net: dict, timestep, pixels: tuple[int, int]) -> dict:
        """Run the graph that this step's schedule asks for on graph-layout network inputs; its outputs by name
        (a network's prediction, a ControlNet's residuals)."""
        t0 = time.perf_counter()
        plan = self.schedule.plan(timestep)
        artifact, runner = ((self.toma_artifact, self.toma_runner) if plan.merge else
                           (self.baseline_artifact, self.baseline_runner))
        if self.head_runner is not None:
            out = self._run_split(plan, runner, net, pixels)
            self.timings.append((plan.step, time.perf_counter() - t0))
            return {self.spec.output_name: out}
        artifact.check_shapes({n: tuple(v.shape) for n, v in net.items()}, pixels)
        dtypes = artifact.input_dtypes()
        feeds = {n: v.to(dtypes[n]) for n, v in net.items()}
        if plan.merge:
            feeds.update(self.schedule.toma_feeds(plan, self._dst_shapes(net), self._device))
        out = runner.run(feeds)
        if plan.merge:
            self.schedule.record(plan, out)
            self.calls["recompute"] += plan.recompute
        self.calls["toma" if plan.merge else "baseline"] += 1
        self.timings.append((plan.step, time.perf_counter() - t0))
        return {name: out[name] for name in self.spec.output_names()}

    def _run_split(self, plan, tail, net: dict, pixels) -> torch.Tensor:
        """The head; then the tail, or (a cached step) the head's prediction from the last tail residual."""
        if plan.step == 0 and plan.call == 0 and self.cache is not None:
            self.cache.reset()                      # a new generation: nothing carries over
        prediction, head_residual, tail_residual = self.spec.cache_io()
        head = self.head_artifact
        head.check_shapes({n: tuple(v.shape) for n, v in net.items()}, pixels)
        dtypes = head.input_dtypes()
        feeds = {n: v.to(dtypes[n]) for n, v in net.items()}
        shape = self._residual_shape(net)
        kept = self.cache.tail_residual(plan.call) if self.cache is not None else None
        feeds[tail_residual] = kept if kept is not None and tuple(kept.shape) == shape else \
            torch.zeros(shape, dtype=dtypes[tail_residual], device=self._device)
        first = self.head_runner.run(feeds)
        if self.cache is not None and not self.cache.decide(plan.step, plan.call, first[head_residual]):
            self.calls["cached"] += 1
            return first[prediction]
        tail_inputs = self.spec.part_axes("tail")
        tail_feeds = {n: first[n] if n in first else feeds[n] for n in tail_inputs}
        if plan.merge:
            tail_feeds.update(self.schedule.toma_feeds(plan, self._dst_shapes(net), self._device))
        out = tail.run(tail_feeds)
        if self.cache is not None:
            self.cache.store(plan.call, out[tail_residual])
        if plan.merge:
            self.schedule.record(plan, out)
            self.calls["recompute"] += plan.recompute
        self.calls["toma" if plan.merge else "baseline"] += 1
        return out[self.spec.output_name]

    def _residual_shape(self, net: dict) -> tuple:
        """(B, H, W, width) of the hidden states between head and tail at this call."""
        batch, height, width = call_grid(self.spec, net)
        tail_residual = self.spec.cache_io()[2]
        declared = next(i["shape"] for i in self.head_artifact.meta["inputs"] if i["name"] == tail_residual)
        return (batch, height, width, declared[-1])

    def _dst_shapes(self, net: dict) -> dict:
        toma = self.toma_artifact.meta["toma"]
        downsample = {g: info["downsample"] for g, info in toma["groups"].items()}
        return dst_shapes(toma["tile"], toma["destinations_per_tile"], downsample, *call_grid(self.spec, net))


def head_of(artifact: Artifact, cache) -> Artifact | None:
    """The head a split tail runs after (the folder its metadata names, beside it), or None for an unsplit network;
    a cache on an unsplit network, or a head passed as the network, is refused in one line."""
    part = artifact.meta.get("part")
    if part == "head":
        raise UsageError(f"{artifact.name} is the head of a First-Block Cache split; pass its tail (the export whose "
                         "toma.json names this head)")
    if part != "tail":
        if cache is not None:
            raise UsageError(f"{artifact.name} is one unsplit network; First-Block Cache needs the head/tail pair "
                             "(toma-export export --cache fbcache:T, or generate without --onnx/--engine)")
        return None
    head = artifact.path.parent.parent / artifact.meta["head"]
    try:
        found = Artifact.load(head, artifact.kind)
    except ArtifactError as err:
        raise ArtifactError(f"{artifact.name} is a First-Block Cache tail whose head {head} is missing ({err}); "
                            "export both again with --cache") from None
    return found


def _schedule(toma: Artifact, schedule):
    """The file's ToMA config, with merge_steps / dst_every / weights_every from `schedule` when given
    (the graph does not depend on them, so one export serves every schedule)."""
    recorded = toma.config
    if schedule is None:
        return recorded
    fixed = ("ratio", "tile", "scale", "blocks", "levels", "sublayers")
    differ = [f for f in fixed if getattr(schedule, f) != getattr(recorded, f)]
    if differ:
        raise UsageError(f"schedule differs from {toma.name} in {', '.join(differ)}: only merge_steps, dst_every and "
                         "weights_every can change without exporting again")
    return schedule


def _check_pair(toma: Artifact, baseline: Artifact) -> None:
    if baseline.config is not None:
        raise UsageError(f"{baseline.name} is a ToMA export; the baseline must be exported without ToMA (--no-toma)")
    for key in ("model", "dtype", "dynamic", "batch", "height", "width", "ranges"):
        if toma.meta.get(key) != baseline.meta.get(key):
            raise UsageError(f"{baseline.name} does not pair with {toma.name}: {key} {baseline.meta.get(key)!r} vs "
                             f"{toma.meta.get(key)!r}; export both with the same options")


def load_network(artifact, baseline=None, share_weights: bool = True, cuda_graphs: bool = True,
                 schedule=None, cache=None) -> ServedNetwork:
    """The drop-in for an exported model.onnx / built engine.json (paths or Artifacts). `baseline`: the same
    model exported or built without ToMA, needed when the ToMA schedule leaves steps unmerged. `schedule`: a
    ToMAConfig overriding the recorded merge_steps / dst_every (its other fields must match the file). `cache`: a
    CacheConfig for a First-Block Cache split (the tail export, which names its head)."""
    artifact = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
    baseline = baseline if baseline is None or isinstance(baseline, Artifact) else Artifact.load(baseline)
    if baseline is not None and baseline.kind != artifact.kind:
        raise UsageError(f"{baseline.name} is an {baseline.kind} artifact but {artifact.name} is an {artifact.kind} "
                         "one; serve both through the same backend")
    return ServedNetwork(artifact, baseline, share_weights, cuda_graphs, schedule, cache)
