"""validate --controlnet: the ControlNet graphs and the network taking their residuals against the fp32 PyTorch
reference, per graph and chained, one step and over a loop.

The chain (every ControlNet, their residuals summed, then the network) is one polygraphy runner, so the
reference record, the forced-destination step, the selection check and the denoising loop are validate's own
(record.py, compare.py). What the chain adds is the graph-by-graph step: each ControlNet against the reference
on the same inputs, and the network fed the reference's residuals, so a failure is named by the graph it comes
from rather than seen only where the network's output has compounded it. Each ControlNet reads its own inputs
(control image, scale, destinations) under a prefix, c0:..., and the shared ones (latents, time, text) plainly.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner

from .. import models
from ..families.controlnet import SCALE
from ..onnx import ExportOptions
from ..onnx.export import check_controlnets, export_controlled
from ..onnx.graph import dst_input, dst_output
from ..resources import default_output
from .metrics import compare, tolerance
from .record import cast_feeds, forced_feeds, run_loop, sample_feeds
from .runners import TorchRunner

DST, DST_OUT = dst_input(""), dst_output("")          # "toma_dst.", "toma_dst_out."


def own(i: int, name: str) -> str:
    """The chain's name for ControlNet i's own input or destination output."""
    for head in (DST, DST_OUT):
        if name.startswith(head):
            return f"{head}c{i}:{name[len(head):]}"
    return f"c{i}:{name}"


class ControlledRunner(BaseRunner):
    """ControlNets, then the network fed the sum of their residuals, as one runner (inputs: the network's without
    its residuals, plus each ControlNet's own under own(i, ...); outputs: the network's, then each ControlNet's
    destinations). `last` keeps every graph's inputs and outputs of the latest call, for the per-graph check."""

    def __init__(self, network, controlnets: list, name: str):
        super().__init__(name=name)
        self.network, self.controlnets = network, controlnets
        self.last: list = []

    def activate_impl(self):
        for r in (*self.controlnets, self.network):
            r.activate()

    def deactivate_impl(self):
        for r in (*self.controlnets, self.network):
            r.deactivate()

    def get_input_metadata_impl(self):
        return self.network.get_input_metadata_impl()

    def infer_impl(self, feed_dict):
        residuals, extra, self.last = {}, OrderedDict(), []
        for i, runner in enumerate(self.controlnets):
            feed = {n: feed_dict[own(i, n)] if own(i, n) in feed_dict else feed_dict[n]
                    for n in _inputs(runner)}
            out = runner.infer(feed, check_inputs=False)
            self.last.append((feed, dict(out)))
            for n, v in out.items():
                if n.startswith(DST_OUT):
                    extra[own(i, n)] = v
                else:           # each graph scales its own residuals by its conditioning_scale input
                    residuals[n] = residuals[n] + np.asarray(v) if n in residuals else np.asarray(v)
        names = _inputs(self.network)
        feed = {n: feed_dict[n] if n not in residuals else residuals[n].astype(_float_of(feed_dict)) for n in names}
        out = self.network.infer(feed, check_inputs=False)
        self.last.append((feed, dict(out)))
        return OrderedDict(**out, **extra)


def _inputs(runner) -> list:
    """A child's input names: the graph's, or the ONNX Runtime session's (polygraphy's metadata wants dtypes, which a
    TorchRunner does not give)."""
    return runner.graph.input_names if isinstance(runner, TorchRunner) else [i.name for i in runner.sess.get_inputs()]


def _float_of(feeds: dict):
    return next((v.dtype for v in feeds.values() if np.asarray(v).dtype.kind == "f"), np.float32)


def plan(model: str, controlnets: list) -> tuple:
    """(network spec taking residuals, ControlNet specs): refusals before anything is loaded."""
    layout = check_controlnets(model, [n for n, _ in controlnets], ExportOptions(text_len=None))
    network = models.get(model)
    return network.with_control(layout), [models.get(n).with_text_len(network.text_len) for n, _ in controlnets]


def reference_runner(spec, specs, controlnets, config, controlnet_toma, dtype, name) -> ControlledRunner:
    """The PyTorch chain in `dtype`, ToMA applied to the network and (unless told not to) to each ControlNet."""
    import torch

    from ..onnx import ToMAGraph
    from ..toma import apply_toma

    def graph(s, toma):
        model = s.load(dtype).to("cuda" if torch.cuda.is_available() else "cpu")
        return TorchRunner(ToMAGraph(model, s, apply_toma(model, toma) if toma else None).eval(), name=s.name)

    return ControlledRunner(graph(spec, config), [graph(s, config if controlnet_toma else None) for s in specs], name)


def onnx_runner(model: str, controlnets: list, config, controlnet_toma, options, progress) -> tuple:
    """(the exported chain on ONNX Runtime, its provider, the files in graph order: ControlNets, then the network).
    Static at the one size validated, at its batch; dynamic over several sizes."""
    from .runners import onnxruntime_runner

    shape = (dict(height=options.sizes[0][0], width=options.sizes[0][1], batch=options.batch)
             if len(options.sizes) == 1 else dict(dynamic=True))
    made = export_controlled(model, [n for n, _ in controlnets], config,
                             Path(options.output_dir or default_output()) / "onnx",
                             ExportOptions(dtype=options.dtype, **shape), controlnet_toma=controlnet_toma,
                             progress=progress)
    paths = [m["onnx"] for m in made["controlnets"]] + [made["network"]["onnx"]]
    runners = [onnxruntime_runner(p) for p in paths]
    return ControlledRunner(runners[-1][0], [r for r, _ in runners[:-1]], "onnxruntime"), runners[-1][1], paths


def make_record(spec, specs, controlnets, reference: ControlledRunner, config, options, size) -> dict:
    """validate's record for the chain: its inputs (each ControlNet's scale its --controlnet SCALE), the step's
    outputs, every group's selection features, and the loop; `graphs` keeps each graph's own step."""
    feeds = sample_feeds(spec, reference.network.graph, options.batch, size)
    feeds = {n: v for n, v in feeds.items() if n not in specs[0].residual_names()}
    for i, (s, runner) in enumerate(zip(specs, reference.controlnets)):
        mine = sample_feeds(s, runner.graph, options.batch, size)
        mine[SCALE] = np.full_like(mine[SCALE], controlnets[i][1])
        feeds.update({own(i, n): v for n, v in mine.items() if n not in feeds or n.startswith(DST)})
    step = dict(reference.infer(feeds, check_inputs=False))
    tiles = {g: t.detach().cpu().numpy() for g, t in reference.network.graph.last_tiles.items()}
    for i, runner in enumerate(reference.controlnets):
        tiles.update({own(i, g): t.detach().cpu().numpy() for g, t in runner.graph.last_tiles.items()})
    record = dict(feeds=feeds, step=step, tiles=tiles, graphs=_forced_parts(reference.last))
    if options.steps:
        record["latents"], record["used"] = run_loop(spec, reference, feeds, options.steps, config, "fp32")
    return record


def _forced_parts(last: list) -> list:
    """Each graph's (inputs with its reference destinations forced, reference outputs)."""
    return [(forced_feeds(feed, out), out) for feed, out in last]


def compare_graphs(record: dict, names: list, candidate: ControlledRunner, options, size) -> list:
    """Each graph on the reference's own inputs (the network on the reference's residuals), its worst output."""
    entries = []
    atol, rtol = tolerance("step", options.dtype, options.atol, options.rtol)
    runners = [*candidate.controlnets, candidate.network]
    for name, runner, (feeds, ref) in zip(names, runners, record["graphs"]):
        out = runner.infer(cast_feeds(feeds, options.dtype, runner), check_inputs=False)
        worst = None
        for output, value in ref.items():
            if output.startswith(DST_OUT):
                continue
            stats = compare(value, out[output], atol, rtol)
            ratio = stats["max_abs"] / max(stats["tolerance"], 1e-30) if stats["passed"] else np.inf
            if worst is None or ratio > worst[0]:
                worst = (ratio, output, stats)
        _, output, stats = worst
        entries.append(dict(kind="step", backends=["torch-fp32", candidate.name], size=f"{size[0]}x{size[1]}", step=0,
                            output=output, graph=name, **stats))
    return entries


def bisect_graphs(reference: ControlledRunner, names: list, paths: list, record: dict, entries: list, options,
                  size) -> dict | None:
    """The first graph out of tolerance (ControlNets first: the network is fed the reference's residuals), and
    on ONNX Runtime the first block within it."""
    from .bisect import bisect

    failed = [e["graph"] for e in entries if not e["passed"]]
    if not failed:
        return None
    i = names.index(failed[0])
    graphs = [*reference.controlnets, reference.network]
    feeds, _ = record["graphs"][i]
    _, rtol = tolerance("step", options.dtype, options.atol, options.rtol)
    found = bisect(graphs[i].graph, paths[i], cast_feeds(feeds, options.dtype, None), rtol)
    return dict(found, first_failing_graph=failed[0], backend="onnxruntime", size=f"{size[0]}x{size[1]}")


def validate_controlled(model: str, config, options, progress) -> dict:
    """validate's report for the chain: per size, each graph's step and the chain's step, selection and loop, for
    every candidate (PyTorch in --dtype, ONNX Runtime); the reference is loaded once and released before them
    (kept for --bisect, which runs it again)."""
    import torch

    from ..artifacts import DTYPES, toma_section
    from .compare import compare_loop, compare_step, selection_step

    controlnets, merged = list(options.controlnets), options.controlnet_toma
    spec, specs = plan(model, controlnets)
    names = [s.name for s in specs] + [spec.name]
    sizes = list(options.sizes or [spec.size(None, None)])
    report = dict(model=spec.name, dtype=options.dtype, providers={}, skipped={}, comparisons=[], selection=[],
                  fidelity=[], toma=toma_section(config), loras=[], reference="torch fp32", quantize=None,
                  quantization=[], controlnets=[dict(name=n, scale=s, toma=bool(config and merged))
                                                for n, s in controlnets])
    if "tensorrt" in options.backends:
        report["skipped"]["tensorrt"] = ("validate --controlnet runs PyTorch and ONNX Runtime candidates; the "
                                         "ControlNet engines are checked by scripts/gpu_checks.sh")
        progress(f"[validate] tensorrt skipped: {report['skipped']['tensorrt']}")
    progress(f"[validate] reference (torch fp32): {', '.join(names)}")
    reference = reference_runner(spec, specs, controlnets, config, merged, torch.float32, "torch-fp32")
    with reference:
        records = []
        for size in sizes:
            progress(f"[validate] reference {size[0]}x{size[1]} px: one step" +
                     (f", then a {options.steps}-step loop" if options.steps else ""))
            records.append(make_record(spec, specs, controlnets, reference, config, options, size))
    if not options.bisect:          # released before the candidates, unless --bisect needs it again
        del reference
    plans = {}
    if "torch" in options.backends and options.dtype != "fp32":
        plans[f"torch-{options.dtype}"] = lambda: (reference_runner(spec, specs, controlnets, config, merged,
                                                                    DTYPES[options.dtype], f"torch-{options.dtype}"),
                                                   None)
    if "onnxruntime" in options.backends:
        def onnxruntime():
            chain, provider, paths = onnx_runner(model, controlnets, config, merged, options, progress)
            report["providers"]["onnxruntime"], report["onnx"] = provider, paths
            return chain, paths
        plans["onnxruntime"] = onnxruntime
    failing = {}
    for name, create in plans.items():
        candidate, paths = create()
        progress(f"[validate] {name}: each graph and the chain, {len(sizes)} size(s)")
        with candidate:
            for i, size in enumerate(sizes):
                graphs = compare_graphs(records[i], names, candidate, options, size)
                chained = compare_step(records[i], {name: candidate}, options, size)
                loop = compare_loop(spec, records[i], {name: candidate}, options, size, config) if options.steps else []
                for entry in chained + loop:
                    entry["graph"] = "chain"
                report["comparisons"] += graphs + chained + loop
                report["selection"] += selection_step(records[i], {name: candidate}, options, size)
                if paths and not all(e["passed"] for e in graphs):
                    failing[i] = (paths, graphs)
        del candidate
    if options.bisect:
        report["bisect"] = [bisect_graphs(reference, names, paths, records[i], graphs, options, sizes[i])
                            for i, (paths, graphs) in failing.items()]
    if not report["comparisons"]:
        report["nothing_compared"] = ("no candidate ran: add onnxruntime to --backends, or validate torch in "
                                      "--dtype fp16/bf16")
    report["passed"] = (bool(report["comparisons"]) and all(c["passed"] for c in report["comparisons"]) and
                        all(s["passed"] for s in report["selection"]))
    return report
