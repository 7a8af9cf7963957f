"""Export a ToMA-patched FLUX transformer / SDXL UNet to ONNX with the selection as `toma::ToMASelect`.

torch.onnx (dynamo) traces ToMAGraph over the network built on the meta device, so no weight is in memory
while it traces; the weights are then streamed into the export's external data file under their
`state_dict` keys (onnx/weights.py). The selection node comes out opaque and its portable body is attached
as a model-local function, the IR version is pinned for the pinned ONNX Runtime, and the full checker runs
before the folder is renamed into place. The folder name hashes every option that changes the file, so an
existing export is reused.
"""
from __future__ import annotations

import contextlib
import logging
import math
import shutil
import sys
import warnings
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .. import lora, models, quantize
from ..artifacts import (DTYPES, EXPORT_FORMAT, EXPORT_META, Artifact, cache_key, claimed, source_digest,
                         staged_dir, toma_section, versions, writable_dir)
from ..errors import ArtifactError, UsageError
from ..lora import LoRA
from ..quantize import Quantization
from ..toma import ToMAConfig, apply_toma
from ..toma.tiles import destinations_per_tile
from .graph import ToMAGraph

IR_VERSION = 10            # onnx 1.23 writes 14 by default; onnxruntime 1.3x loads <= 10


@dataclass(frozen=True)
class ExportOptions:
    """Everything besides the model and ToMA config that changes the exported file."""

    height: int | None = None      # sample size in pixels (static export: the size; dynamic: the opt size)
    width: int | None = None
    batch: int = 1                 # static batch; dynamic exports cover the spec's batch range
    dynamic: bool = False          # one file valid across the spec's size/batch/text ranges
    dtype: str | None = None       # None = the dtype the model's weights are stored in (fp32 for tiny models)
    opset: int = 20
    min_size: tuple | None = None  # dynamic range override, (height, width) pixels
    max_size: tuple | None = None
    text_len: int | None = None    # text tokens (static: the length; dynamic: the opt); None = the model's
    loras: tuple = ()              # ((path, scale), ...) fused into the weights; the graph stays the same
    link_weights: bool = False     # point into the folder's safetensors files (hard links) where no conversion is
                                   # needed, instead of copying; onnx.load refuses hard-linked external data
    part: str | None = None        # one graph of the network split for First-Block Cache (FLUX: head, tail)
    quant: Quantization | None = None  # 8-bit Q/DQ on the calibrated layers, the scales placed as data
    control: tuple = ()            # the network takes these ControlNet residuals as inputs (residual_layout)


def export(model_name: str, config: ToMAConfig | None, output_dir, options: ExportOptions = ExportOptions(),
           force: bool = False, progress=None) -> dict:
    """Export (or reuse) the ONNX file; returns the metadata written beside it as toma.json.

    config=None exports the network without ToMA (the baseline for parity and speed comparisons)."""
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    spec, options, final, keys, (height, width), ranges = _plan(model_name, config, output_dir, options)
    meta = None if force else _reuse(final, progress)
    if meta is not None:
        return meta
    with claimed(final, progress):
        meta = None if force else _reuse(final, progress)      # made by the process we waited for
        if meta is not None:
            return meta
        t0 = time.perf_counter()
        source = _weight_source(spec, options, progress)       # opened and checked (LoRAs too) before any trace
        same_graph = None if force else _same_graph(final.parent, keys["graph"])
        if same_graph is not None:
            return _with_weights(*same_graph, spec, source, final, keys, t0, options.link_weights, progress,
                                 _pairing(model_name, output_dir, options))
        progress(f"[export 1/4] building {spec.name} ({options.dtype}) on the meta device, no weights in memory"
                 f"{', applying ToMA' if config else ', no ToMA'}")
        model = quantize.apply(spec.skeleton(DTYPES[options.dtype]), options.quant)
        report = apply_toma(model, config) if config else None
        if options.part and report and spec.head_block in report.blocks:
            raise UsageError(f"ToMA merges {spec.head_block}, which First-Block Cache runs on every step as its head "
                             "(the graph outside ToMA); leave the first blocks unmerged (the default --blocks) or "
                             "pass --cache none")
        graph = ToMAGraph(model, spec, report, options.part).eval()
        units = _units(spec, graph)
        for size in ranges["sizes"] if options.dynamic else [(height, width)]:
            _check_size(spec, units, *size)

        sample_batch = 2 if options.dynamic else options.batch   # batch 1 would be specialised by torch.export
        net = graph.net_inputs(spec.graph_inputs(batch=sample_batch, height=height, width=width,
                                                 dtype=DTYPES[options.dtype], smooth=True))
        args = tuple(net.values()) + tuple(graph.sample_toma_inputs(net).values())
        args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
        dynamic_shapes = _dynamic_shapes(spec, graph, units, ranges) if options.dynamic else None

        progress(f"[export 2/4] tracing with torch.onnx (opset {options.opset}"
                 f"{', dynamic batch/size/text' if options.dynamic else ''}); this takes a minute")
        program = trace(graph, args, options.opset, dynamic_shapes=dynamic_shapes, input_names=graph.input_names,
                        output_names=graph.output_names)

        with staged_dir(final) as tmp:
            progress(f"[export 3/4] placing the weights ({source.describe}), attaching the ToMASelect body")
            onnx_path = tmp / "model.onnx"
            placed = write_model(program, onnx_path, options.opset, source, prefix="model.", progress=progress,
                                 link=options.link_weights)
            progress("[export 4/4] running the ONNX checker (full_check)")
            from . import weights

            weights.check(onnx_path)
            meta = _metadata(spec, config, options, report, graph, onnx_path, dict(placed, **keys["weights_meta"]),
                             (height, width), ranges, keys, time.perf_counter() - t0)
            meta.update(_pairing(model_name, output_dir, options))
            meta["onnx"] = str(final / "model.onnx")
            Artifact("onnx", onnx_path, meta).save()
        progress(f"[export] wrote {meta['onnx']} in {meta['export_seconds']:.0f} s")
        return meta


def export_split(model_name: str, config: ToMAConfig | None, output_dir, options: ExportOptions = ExportOptions(),
                 force: bool = False, progress=None, make=None) -> dict:
    """The network as First-Block Cache runs it: the head (never merged, so one head serves every ToMA setting)
    and the tail with ToMA. Returns the tail's metadata, which names the head's folder beside it ("head"); the
    cache threshold is chosen where the pair runs, not here. `make` exports each part (default `export`; callers
    that go on to load a pipeline hand in child.export_in_child, which sits above this module)."""
    make = make or export
    make(model_name, None, output_dir, replace(options, part="head"), force=force, progress=progress)
    return make(model_name, config, output_dir, replace(options, part="tail"), force=force, progress=progress)


def export_controlled(model_name: str, controlnets, config: ToMAConfig | None, output_dir,
                      options: ExportOptions = ExportOptions(), controlnet_toma: bool = True, force: bool = False,
                      progress=None, make=None) -> dict:
    """The network taking ControlNet residuals, and each ControlNet as its own graph (ToMA in its blocks too,
    unless `controlnet_toma` is false). `controlnets`: names or folders. Returns {"network": its metadata,
    "controlnets": theirs}. They are checked against each other before anything is exported."""
    make = make or export
    layout = check_controlnets(model_name, controlnets, options)
    # a LoRA is the network's; a ControlNet folder's own defaults (its variant's text length, the real model's
    # sizes) give way to the network it steers
    network = models.get(model_name)
    own = replace(options, loras=(), text_len=options.text_len or network.text_len,
                  height=options.height or network.default_size[0], width=options.width or network.default_size[1],
                  min_size=options.min_size or network.size_range[0],
                  max_size=options.max_size or network.size_range[2])
    metas = [make(name, config if controlnet_toma else None, output_dir, own, force=force, progress=progress)
             for name in dict.fromkeys(controlnets)]
    network = make(model_name, config, output_dir, replace(options, control=layout), force=force, progress=progress)
    return dict(network=network, controlnets=metas)


def refuse_with_controlnets(cache: bool = False, quant: bool = False) -> None:
    """What ControlNets do not combine with yet (a First-Block Cache split, 8-bit), one line each, before any work."""
    if cache:
        raise UsageError("First-Block Cache does not split a network that takes ControlNet residuals yet; pass "
                         "--cache none with --controlnet")
    if quant:
        raise UsageError("8-bit exports with ControlNets are not supported yet; pass --quantize none with --controlnet")


def check_controlnets(model_name: str, controlnets, options: ExportOptions) -> tuple:
    """The residual layout every ControlNet gives the network; one line naming the first that does not fit."""
    if not controlnets:
        raise UsageError("no ControlNet given: pass --controlnet NAME|FOLDER")
    refuse_with_controlnets(cache=bool(options.part), quant=bool(options.quant))
    network = models.get(model_name).with_text_len(options.text_len)
    height, width = network.size(options.height, options.width)
    layouts = {}
    for name in controlnets:
        spec = models.get(name).with_text_len(network.text_len)
        layout = spec.residual_layout()
        if not layout:
            raise UsageError(f"{name} is not a ControlNet (a {spec.family} network); --controlnet takes "
                             "ControlNetModel or FluxControlNetModel folders, or sdxl-tiny-controlnet / "
                             "flux-tiny-controlnet")
        if spec.family != network.family:
            raise UsageError(f"{name} is a {spec.family} ControlNet; {network.name} is a {network.family} network")
        steered = network.with_control(layout)
        ours, theirs = steered.input_shapes(1, height, width), spec.input_shapes(1, height, width)
        wrong = [n for n in ours if n in theirs and ours[n] != theirs[n]]
        if wrong:
            raise UsageError(f"{name} does not fit {network.name}: its {wrong[0]} is {list(theirs[wrong[0]])}, the "
                             f"network's {list(ours[wrong[0]])}")
        layouts[name] = layout
    if len(set(layouts.values())) > 1:
        raise UsageError("the ControlNets give residuals of different layouts (" + ", ".join(
            f"{n}: {l}" for n, l in layouts.items()) + "); ControlNets used together must have the same blocks")
    return next(iter(layouts.values()))


def cached(model_name: str, config: ToMAConfig | None, output_dir, options: ExportOptions = ExportOptions(),
           progress=None) -> dict | None:
    """The metadata of a finished identical export, or None; cheap (no model is loaded), so callers that would
    export in another process can skip starting one."""
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    return _reuse(_plan(model_name, config, output_dir, options)[2], progress)


def _plan(model_name: str, config: ToMAConfig | None, output_dir, options: ExportOptions):
    """Checked options (the dtype defaulted to the weights') and the artifact's keys: (spec at the text length,
    options, final folder, keys, size, ranges). The key has two halves: the graph's (architecture, ToMA, dtype,
    shapes, opset, versions) and the weights' (the folder's fingerprint, the LoRAs' digests and scales), so
    exports that differ only in weights share one traced graph."""
    spec = models.get(model_name)
    quant = options.quant
    options = replace(options, dtype=options.dtype or spec.default_dtype)
    if options.dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    if not 17 <= options.opset <= 22:
        raise UsageError(f"opset must be between 17 and 22 (20 recommended; 23 emits Attention, which TensorRT "
                         f"builds reject), got {options.opset}")
    if options.batch < 1:
        raise UsageError(f"batch must be >= 1, got {options.batch}")
    if quant:
        quantize.check_opset(options.opset)
    quantize.refuse(quant and quant.mode, options.loras, options.part)
    if options.part is not None:
        from ..cache import check_split

        check_split(spec, options.part)
    if options.control:
        refuse_with_controlnets(cache=bool(options.part))
    spec = spec.with_text_len(options.text_len).with_control(options.control)
    height, width = spec.size(options.height, options.width)
    ranges = _ranges(spec, options, (height, width))
    out_root = writable_dir(output_dir)

    # the keys hold resolved values, so equal requests phrased differently share one export
    vers = dict(versions("toma-export", "torch", "diffusers", "onnx", "onnxscript"), sources=source_digest())
    graph_key = cache_key(dict(format=EXPORT_FORMAT, family=spec.family, variant=spec.variant,
                               architecture=spec.architecture(), toma=asdict(config) if config else None,
                               dtype=options.dtype, opset=options.opset, dynamic=options.dynamic,
                               batch=None if options.dynamic else options.batch, size=(height, width),
                               text_len=spec.text_len, ranges=ranges if options.dynamic else None, versions=vers,
                               **({"part": options.part} if options.part else {}),
                               **({"control": list(spec.control)} if spec.control else {}),
                               **({"quant": _quant_layout(quant)} if quant else {})))
    loras = [dict(file=path, sha256=LoRA(path).digest(), scale=scale) for path, scale in lora.as_options(options.loras)]
    base = spec.base_label()
    weights_key = cache_key(dict(base=base, fingerprint=spec.weights_fingerprint(), dtype=options.dtype,
                                 loras=[(x["sha256"], x["scale"]) for x in loras], linked=options.link_weights,
                                 **({"scales": quant.digest} if quant else {})))
    keys = dict(graph=graph_key, weights=weights_key, whole=f"{graph_key}-{weights_key}", versions=vers,
                weights_meta=dict(key=weights_key, base=base, loras=loras))
    part = f"-{options.part}" if options.part else ""
    mode = f"-{quant.mode}" if quant else ""
    control = "-control" if spec.control else ""
    final = out_root / f"{Path(spec.name).name}{'' if config else '-base'}{part}{control}{mode}-{keys['whole']}"
    return spec, options, final, keys, (height, width), ranges


def _weight_source(spec, options: ExportOptions, progress=None):
    """The network's weights, tensor by tensor, with the LoRAs fused in (refused here, before any work, when they
    do not fit)."""
    source = quantize.with_scales(spec.weight_source(), options.quant)
    if not options.loras:
        return source
    changes = lora.terms(options.loras, spec.family, source.shapes(), spec.name, progress)
    return lora.fused(source, changes, "+ " + ", ".join(LoRA(*x).describe() for x in lora.as_options(options.loras)))


def _quant_layout(quant: Quantization) -> dict:
    """What of a calibration shapes the graph: the mode, the level and which layers hold which scales (the
    scales' values are data, in the weights' key)."""
    scales, _ = quantize.load_scales(quant.scales)
    return dict(mode=quant.mode, level=quant.level, layout=cache_key(sorted(scales)))


def _same_graph(root: Path, graph_key: str) -> tuple[Path, dict] | None:
    """(folder, metadata) of a finished export in `root` with this graph (another weight set: a fine-tune, other
    LoRAs), or None."""
    for folder in sorted(root.glob(f"*-{graph_key}-*")):
        if folder.name.startswith("."):
            continue
        try:
            meta = Artifact.load(folder, "onnx").meta
        except ArtifactError:
            continue
        if meta.get("graph_key") == graph_key:
            return folder, meta
    return None


def _pairing(model_name: str, output_dir, options: ExportOptions) -> dict:
    """A tail's metadata names the head it runs after: the folder the same request exports beside it."""
    if options.part != "tail":
        return {}
    return dict(head=_plan(model_name, None, output_dir, replace(options, part="head"))[2].name)


def _with_weights(graph_dir: Path, meta: dict, spec, source, final: Path, keys: dict, t0: float, link: bool,
                  progress, pairing: dict) -> dict:
    """A new export from another export's graph (`meta` its metadata): its nodes unchanged, its weights placed
    anew (weights.rewrite points each initializer at them), so no trace; what is left is writing the weights."""
    from . import weights

    progress(f"[export 1/2] same graph as {graph_dir.name} (architecture, ToMA, shapes, versions): no trace, "
             "only the weights are written")
    with staged_dir(final) as tmp:
        shutil.copyfile(graph_dir / "model.onnx", tmp / "model.onnx")
        progress(f"[export 2/2] placing the weights ({source.describe})")
        summary = weights.rewrite(tmp / "model.onnx", source, link, progress)
        meta = dict(meta, key=keys["whole"], graph_key=keys["graph"], model=spec.name, source=spec.source,
                    onnx=str(final / "model.onnx"), weights=dict(summary, **keys["weights_meta"]),
                    graph_from=graph_dir.name, export_seconds=round(time.perf_counter() - t0, 1), **pairing)
        Artifact("onnx", tmp / "model.onnx", meta).save()
    progress(f"[export] wrote {meta['onnx']} in {meta['export_seconds']:.1f} s (weights only)")
    return meta


def _reuse(final: Path, progress) -> dict | None:
    if not (final / EXPORT_META).is_file():
        return None
    try:
        meta = Artifact.load(final, "onnx").meta
    except ArtifactError as err:       # a damaged cache entry is made again, not trusted
        progress(f"[export] exporting again: {err}")
        return None
    progress(f"[export] reusing {final}")
    return meta


def _ranges(spec, options: ExportOptions, opt: tuple[int, int]) -> dict:
    """The dynamic profile's sizes, batches and text lengths; a static export needs none, so it may use any
    size the network and the tiles allow."""
    lo, _, hi = spec.size_range
    if not options.dynamic:
        return dict(sizes=[opt, opt, opt], batch=[options.batch] * 3, text=[spec.text_len] * 3)
    sizes = [spec.size(*(options.min_size or lo)), opt, spec.size(*(options.max_size or hi))]
    if not (sizes[0][0] <= opt[0] <= sizes[2][0] and sizes[0][1] <= opt[1] <= sizes[2][1]):
        raise UsageError(f"size {opt[0]}x{opt[1]} lies outside the range {sizes[0][0]}x{sizes[0][1]} .. "
                         f"{sizes[2][0]}x{sizes[2][1]} px; widen --min-size/--max-size")
    return dict(sizes=sizes, batch=list(spec.batch_range), text=list(spec.text_range))


def _units(spec, graph: ToMAGraph) -> dict:
    """Cells per step of each spatial axis: every merged group's tile grid and the network itself must
    divide the graph's spatial size, so sizes move in steps of the lcm of those divisors."""
    out = {}
    for name in ("height", "width"):
        divisors = [div for axes in graph.toma_axes().values() for sym, div in axes.values() if sym == name]
        out[name] = math.lcm(spec.cell_multiple, *divisors)
    return out


def _check_size(spec, units, height: int, width: int) -> None:
    cells = spec.cells(height, width)
    for (name, unit), n in zip(units.items(), cells):
        if n % unit:
            px = unit * spec.pixels_per_cell
            raise UsageError(f"{spec.name}: {height}x{width} px does not fit the tiles: the {name} must be a "
                             f"multiple of {px} px (tile times the merged level's down-sampling)")


def _dynamic_shapes(spec, graph: ToMAGraph, units: dict, ranges: dict):
    from torch.export import Dim

    (h0, w0), _, (h1, w1) = [spec.cells(*s) for s in ranges["sizes"]]
    # height/width roots count steps of `units` cells; ONNX shapes then read e.g. 4*h_steps
    roots = dict(batch=(Dim("batch", min=ranges["batch"][0], max=ranges["batch"][2]), 1),
                 text=(Dim("text", min=ranges["text"][0], max=ranges["text"][2]), 1),
                 height=(Dim("h_steps", min=h0 // units["height"], max=h1 // units["height"]), units["height"]),
                 width=(Dim("w_steps", min=w0 // units["width"], max=w1 // units["width"]), units["width"]))

    def dim(symbol, divisor):
        root, unit = roots[symbol]
        return root if unit // divisor == 1 else (unit // divisor) * root

    axes = {**graph.net_axes(), **graph.toma_axes()}
    return (tuple({a: dim(*sd) for a, sd in axes.get(n, {}).items()} or None for n in graph.input_names),)


def trace(module: torch.nn.Module, args: tuple, opset: int, **kwargs):
    """torch.onnx (dynamo) export of `module`, quietly (the exporter narrates on stdout, kept for our JSON, and
    logs that torchvision ops are missing), and without the exporter's optimizer: its constant folding fails
    on meta weights and turns a Linear's transposed weight into an unnamed copy; write_model optimizes once
    the weights are in place. A module on the meta device is traced with meta as the default device, so
    tensors made during the trace meet its weights there."""
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    device = next(module.parameters(), torch.empty(0)).device
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings(), \
            torch.device("meta") if device.type == "meta" else contextlib.nullcontext():
        warnings.simplefilter("ignore")
        return torch.onnx.export(module, args, dynamo=True, opset_version=opset, verbose=False, optimize=False,
                                 **kwargs)


@contextlib.contextmanager
def linear_rewrites():
    """Keep the exporter's optimizer linear in the node count.

    onnxscript's rewrite rules with two output nodes (SlicesSplit: two Slices of one value become a Split)
    index the whole graph for every node they are tried on, so the optimizer's time grows with the square of
    the node count: 19 of the 45 s a tiny dynamic export took. Here such a rule is tried only on nodes of its
    first output's op type, where a match can start; the optimized graph is byte for byte the same."""
    rule = matcher = None
    with contextlib.suppress(ImportError, AttributeError):      # another onnxscript: its optimizer as it is
        from onnxscript.rewriter import pattern, rules

        rule = rules.common.slice_split_rule
        if isinstance(rule._matcher, pattern.PatternMatcher) and len(rule._matcher.pattern.output_nodes) > 1:
            matcher = rule._matcher
    if matcher is None:
        yield
        return
    rule._matcher = _FromOutputOp(matcher)
    try:
        yield
    finally:
        rule._matcher = matcher


class _FromOutputOp:
    """A multi-output matcher that answers "no" at once for a node its first output node cannot be."""

    def __init__(self, inner):
        self.inner, self.pattern = inner, inner.pattern
        self.op = inner.pattern.output_nodes[0].op_identifier()

    def match(self, model, graph_or_function, node, **kwargs):
        from onnxscript.rewriter import pattern

        if self.op is not None and node.op_identifier() != self.op:
            return pattern.MatchResult().fail(f"not a {self.op[1]} node")
        return self.inner.match(model, graph_or_function, node, **kwargs)

    def __str__(self) -> str:
        return str(self.inner)


def _keeps_weights(node) -> bool | None:
    """The optimizer's folding rule: never fold a node that reads a weight (a Linear's Transpose would become
    an unnamed copy of the weight); elsewhere its own rule."""
    return False if any(v is not None and v.is_initializer() for v in node.inputs) else None


def write_model(program, path: Path, opset: int, source, prefix: str = "", progress=None, link: bool = False) -> dict:
    """Optimize the traced graph without touching a weight (shapes folded, SplitToSequence made Split, ...),
    then save it with every weight in external data beside it (weights.place: model.onnx.data, or with `link`
    the folder's own safetensors files, hard-linked), from `source` and named by its `state_dict` key
    (initializer `prefix` + key in the trace), and the selection body attached. Returns the weights' summary."""
    import onnx
    import onnx_ir as ir
    import onnxscript.optimizer

    from . import weights
    from .select_function import attach

    weights.hide(program.model, source, prefix)
    dedup = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")
    level = dedup.level
    dedup.setLevel(logging.ERROR)          # "skipped deduplication of ... as it has no constant value": ours
    try:
        with linear_rewrites(), contextlib.redirect_stdout(sys.stderr):
            onnxscript.optimizer.optimize_ir(program.model, should_fold=_keeps_weights)
    finally:
        dedup.setLevel(level)
    summary = weights.write(program.model, path, source, prefix, link, progress)
    model = ir.serde.serialize_model(program.model)
    streamed = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    _constants_as_nodes(model, streamed)
    _zero_points(model)
    attach(model, opset)
    model.ir_version = IR_VERSION
    onnx.save(model, str(path))
    return summary


def _constants_as_nodes(model, weights: set) -> None:
    """Turn the small initializers the optimizer folded (shapes, scalars, named val_N) into Constant nodes, so
    that every initializer is a weight named by its key."""
    import onnx

    folded = [t for t in model.graph.initializer if t.name not in weights]
    if not folded:
        return
    keep = [t for t in model.graph.initializer if t.name in weights]
    nodes = [onnx.helper.make_node("Constant", [], [t.name], name=f"folded_{t.name}", value=t) for t in folded]
    nodes += list(model.graph.node)
    del model.graph.initializer[:], model.graph.node[:]
    model.graph.initializer.extend(keep)
    model.graph.node.extend(nodes)


def _zero_points(model) -> None:
    """Give every QuantizeLinear / DequantizeLinear the trace left without one a zero point: a Constant of zeros
    in the quantized type (int8 or float8 E4M3), shaped like its scale. The type travels in the trace as
    QuantizeLinear's output_dtype, which opsets below 21 lack; and ONNX Runtime fuses Q/DQ around a MatMul or
    Conv into its integer kernels only where the zero point is a constant."""
    import onnx

    nodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not n.domain
             and len(n.input) == 2]
    if not nodes:
        return
    scale_dims = {t.name: list(t.dims) for t in model.graph.initializer}
    kind = {}
    for n in nodes:
        if n.op_type == "QuantizeLinear":
            attr = next(a for a in n.attribute if a.name == "output_dtype")
            kind[n.output[0]] = attr.i
            n.attribute.remove(attr)
    made, constants = {}, []
    for n in nodes:
        dtype = kind[n.output[0] if n.op_type == "QuantizeLinear" else n.input[0]]
        dims = scale_dims[n.input[1]]
        key = (dtype, tuple(dims))
        if key not in made:
            made[key] = f"zero_point_{onnx.helper.tensor_dtype_to_string(dtype).split('.')[-1].lower()}_" + \
                        ("x".join(map(str, dims)) or "scalar")
            value = onnx.helper.make_tensor("value", dtype, dims, [0] * max(1, math.prod(dims)))
            constants.append(onnx.helper.make_node("Constant", [], [made[key]], name=made[key], value=value))
        n.input.append(made[key])
    nodes = constants + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _io(values) -> list:
    import onnx

    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim]
        out.append(dict(name=v.name, dtype=onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, shape=shape))
    return out


def _metadata(spec, config, options, report, graph, path, weights, size, ranges, keys, seconds) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    profiles = {}
    if options.dynamic:
        shapes = []
        for (h, w), b, t in zip(ranges["sizes"], ranges["batch"], ranges["text"]):
            s = spec.input_shapes(b, h, w, t, options.part)
            s.update(graph.toma_shapes(b, *spec.cells(h, w)))
            shapes.append(s)
        profiles = {name: dict(min=list(shapes[0][name]), opt=list(shapes[1][name]), max=list(shapes[2][name]))
                    for name in shapes[0]}
    return dict(
        format=EXPORT_FORMAT, key=keys["whole"], graph_key=keys["graph"], model=spec.name, family=spec.family,
        source=spec.source,
        onnx=str(path), external_data=True, weights=weights, dtype=options.dtype, opset=options.opset,
        ir_version=IR_VERSION,
        dynamic=options.dynamic, batch=None if options.dynamic else options.batch, height=size[0], width=size[1],
        text_len=spec.text_len, variant=spec.variant, part=options.part,
        control=list(spec.control) or None, residuals=list(spec.residual_layout()) or None,
        ranges=ranges if options.dynamic else None, profiles=profiles,
        inputs=_io(model.graph.input), outputs=_io(model.graph.output),
        toma=dict(toma_section(config), destinations_per_tile=destinations_per_tile(config.tile, config.ratio),
                  recompute_input="toma_recompute",
                  groups={g: dict(blocks=report.groups[g], downsample=report.downsample[g],
                                  input=f"toma_dst.{g}", output=f"toma_dst_out.{g}") for g in report.groups},
                  selection_nodes=sum(n.domain == "toma" for n in model.graph.node)) if config else None,
        quantize=dict(mode=options.quant.mode, level=options.quant.level, scales=options.quant.scales,
                      digest=options.quant.digest,
                      quantized_layers=sum(n.op_type == "QuantizeLinear" for n in model.graph.node) // 2)
        if options.quant else None,
        versions=keys["versions"], export_seconds=round(seconds, 1),
    )
