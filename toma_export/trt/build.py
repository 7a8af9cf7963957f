"""`toma-export build`: export (or reuse) the ONNX file, in a child process, then build a TensorRT or
TensorRT-RTX engine.

What runs the selection (`--selection`): the `toma::ToMASelect` plugin in its ahead-of-time form, so the
engine embeds the Triton kernel's PTX and runs without Python; or the op's portable ONNX body, which the
parser inlines. `auto` takes the plugin where it can run (full TensorRT 10.9+, the first with AOT Python
plugins, and a CUDA GPU) and the body elsewhere, TensorRT-RTX included (it loads no plugins), saying why in
one line. The engine folder's key covers the ONNX key, the backend and its version, the plugin version, the
PTX ISA version and the target, and engine.json records them so that an engine is never used by a TensorRT
or plugin it was not built with.

`--weightless` builds a refittable plan without its weights, which the runners refit from the export's ONNX
at load (runtime/tensorrt.py). `refit` (BuilderFlag.REFIT + STRIP_PLAN) takes any weight set of the graph, so
its plan is keyed by the graph alone and lives in a folder of its own; each weight set's engine folder holds
engine.json, naming the ONNX to refit from, and a hard link to that plan. A second weight set of the same graph
(a LoRA, a fine-tune) therefore builds nothing. `identical` (REFIT_IDENTICAL + STRIP_PLAN) takes only the
weights it was built from, so it is keyed like a normal engine; plain REFIT may drop a GEMM bias (TensorRT
11.3's docs), which REFIT_IDENTICAL does not.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .. import models, resources
from ..artifacts import ENGINE_META, Artifact, cache_key, claimed, link_or_copy, staged_dir, writable_dir
from ..errors import ArtifactError, ExecutionError, MissingComponent, UsageError
from ..onnx import ExportOptions, export_in_child
from ..toma import ToMAConfig
from . import backend as backends

SELECTIONS = ("auto", "plugin", "body")
AOT_PLUGINS = (10, 9)          # TensorRT's first version with AOT Python plugins (aot_impl, PREFER_AOT_...)
PLUGIN, BODY, NONE = "plugin (AOT Triton kernel)", "inlined ONNX body", "none (ToMA off)"
# --weightless MODE -> the builder flags it sets: STRIP_PLAN leaves the refittable weights out of the plan
WEIGHTLESS = {"refit": ("REFIT", "STRIP_PLAN"), "identical": ("REFIT_IDENTICAL", "STRIP_PLAN")}


class BuildError(ExecutionError):
    """The parser or builder refused the network."""


class EngineMismatch(ArtifactError):
    """An engine built by another TensorRT or plugin version than the one installed."""


@dataclass(frozen=True)
class BuildOptions:
    backend: str | None = None     # tensorrt | tensorrt-rtx | None = the first that imports
    target: str | None = None      # TensorRT-RTX compute capability, e.g. sm89 (default sm89)
    dtype: str | None = None       # None = the recipe's
    min_size: tuple | None = None  # None = the recipe's; (height, width) pixels
    opt_size: tuple | None = None
    max_size: tuple | None = None
    static: bool = False           # one shape (the opt size, batch 1) instead of a profile
    text_len: int | None = None    # text tokens (static: the length; dynamic: the opt); None = the model's
    timing_cache: str | None = None
    verbose: bool = False          # TensorRT warnings (duplicate inlined node names, int64 bindings...) too
    selection: str = "auto"        # auto | plugin | body: what runs toma::ToMASelect in the engine
    ptx_version: int | None = None # PTX ISA of the plugin's kernel, e.g. 84; None = the driver's, else 8.4
    weightless: str | None = None  # None | refit | identical: a weight-stripped plan, refitted at load
    loras: tuple = ()              # ((absolute path, scale), ...) fused into the export's weights
    part: str | None = None        # one graph of a First-Block Cache split (build_split builds both)
    quant: object = None           # quantize.Quantization: an 8-bit Q/DQ export, built strongly typed
    control: tuple = ()            # the network takes these ControlNet residuals (build_controlled)


def describe_selection(selection: str, reason: str | None) -> str:
    """The selection and why it was chosen, for people; a baseline's label already says ToMA is off."""
    return selection if selection == NONE or not reason else f"{selection} ({reason})"


def recipe(model: str) -> dict:
    """The build recipe for a registered model, or defaults for its family (local folders)."""
    spec = models.get(model)
    path = resources.recipe_path(spec.name if spec.name in resources.recipe_names() else spec.family)
    data = json.loads(path.read_text())
    data["model"] = model
    return data


def plugin_version() -> str:
    """Version of the selection plugin: a hash of its kernel, PTX and plugin sources."""
    digest = hashlib.sha256()
    for name in ("select_kernel", "ptx", "trt_plugin"):
        digest.update(Path(importlib.util.find_spec(f"toma_export.plugins.{name}").origin).read_bytes())
    return "1." + digest.hexdigest()[:10]


def trt_version(trt) -> tuple[int, int]:
    parts = backends.version(trt).split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def choose_selection(requested: str, backend: str, trt, cuda: bool | None = None) -> tuple[bool, str]:
    """(use the plugin?, why) for `--selection requested` on this backend; refuses an impossible request."""
    if requested not in SELECTIONS:
        raise UsageError(f"--selection must be one of {', '.join(SELECTIONS)}, got {requested!r}")
    if requested == "body":
        return False, "--selection body"
    blocker = None
    if backend == "tensorrt-rtx":
        blocker = "TensorRT-RTX loads no plugins"
    elif trt_version(trt) < AOT_PLUGINS:
        blocker = (f"TensorRT {backends.version(trt)} has no AOT Python plugins "
                   f"({AOT_PLUGINS[0]}.{AOT_PLUGINS[1]} is the first)")
    elif not (_cuda_available() if cuda is None else cuda):
        blocker = "there is no CUDA GPU to compile the plugin's kernel for"
    elif importlib.util.find_spec("triton") is None:
        blocker = "triton is not installed (pip install triton), and it compiles the plugin's kernel"
    if blocker is None:
        return True, f"TensorRT {backends.version(trt)} with a CUDA GPU"
    if requested == "plugin":
        raise UsageError(f"--selection plugin cannot be built: {blocker}; use --selection body (the inlined "
                         "ONNX body) or auto")
    return False, blocker


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def build_split(model: str, toma: ToMAConfig | None, output_dir=None, options: BuildOptions = BuildOptions(),
                force: bool = False, progress=None) -> dict:
    """The two engines First-Block Cache runs, from the head and tail exports (onnx/export.py's export_split): the
    head's first, then the tail's, whose key and engine.json name the head's folder, so the pair is one key.
    Returns the tail's metadata."""
    from dataclasses import replace

    head = build(model, None, output_dir, replace(options, part="head"), force, progress)
    return build(model, toma, output_dir, replace(options, part="tail"), force, progress,
                 head=Path(head["engine"]).parent.name)


def build(model: str, toma: ToMAConfig | None, output_dir=None, options: BuildOptions = BuildOptions(),
          force: bool = False, progress=None, head: str | None = None) -> dict:
    """Build (or reuse) the engine; returns the metadata written beside it as engine.json.

    `toma=None` builds the baseline without ToMA. Every engine.json names `plan` (the plan file) and `weights`
    (the ONNX whose weights the plan holds or, weightless, is refitted from at load). `head`: for the tail of a
    First-Block Cache split, the head engine's folder beside it (build_split)."""
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    name, trt = backends.load(options.backend)
    target = _target(name, trt, options.target)
    plan = recipe(model)
    sizes = {k: getattr(options, f"{k}_size") or tuple(plan["sizes"][k]) for k in ("min", "opt", "max")}
    dtype = options.dtype or plan["dtype"]
    out_root = writable_dir(output_dir or resources.default_output())
    use_plugin, why, ptx_version, capability = False, "ToMA off", None, None
    if toma is not None:
        use_plugin, why = choose_selection(options.selection, name, trt)
    if use_plugin:
        from ..plugins import ptx

        capability = ptx.building_gpu()
        ptx_version, ptx_why = ptx.choose(capability, options.ptx_version)
        why += f"; PTX ISA {ptx_version / 10:.1f} ({ptx_why})"
    elif options.ptx_version is not None and options.selection == "body":
        raise UsageError("--ptx-version applies to the plugin only; drop it, or use --selection plugin/auto")
    if options.weightless is not None:
        check_weightless(name, trt, options.weightless)         # before the export: a refusal costs nothing
    if options.quant is not None:
        check_quant(options.quant.mode, name, target)

    # in a child process: the traced model would otherwise stay in this one's heap while TensorRT builds
    export_options = ExportOptions(
        height=sizes["opt"][0], width=sizes["opt"][1], dynamic=not options.static, dtype=dtype,
        min_size=None if options.static else sizes["min"], max_size=None if options.static else sizes["max"],
        text_len=options.text_len, loras=options.loras, part=options.part, quant=options.quant,
        control=options.control)
    onnx_meta = export_in_child(model, toma, out_root / "onnx", export_options, force=force, progress=progress)
    fields = dict(onnx=onnx_meta["key"], backend=name, backend_version=backends.version(trt),
                  plugin_version=plugin_version() if use_plugin else None, ptx_version=ptx_version, target=target)
    if options.weightless:
        fields["weightless"] = options.weightless
    if options.part:
        fields.update(part=options.part, **({"head": head} if head else {}))
    part = f"-{options.part}" if options.part else ""
    final = out_root / f"{Path(onnx_meta['model']).name}{part}-{name}-{cache_key(fields)}"
    if (final / ENGINE_META).is_file() and not force:
        return _reuse(final, trt, progress)
    with claimed(final, progress):
        if (final / ENGINE_META).is_file() and not force:     # built by the process we waited for
            return _reuse(final, trt, progress)
        selection = PLUGIN if use_plugin else BODY if onnx_meta["toma"] else NONE
        meta = dict(fields, model=onnx_meta["model"], engine=str(final / "engine.plan"), onnx=onnx_meta["onnx"],
                    onnx_key=onnx_meta["key"], graph_key=graph_key(onnx_meta), weights_key=weights_key(onnx_meta),
                    selection=selection, selection_reason=why, dtype=dtype,
                    dynamic=onnx_meta["dynamic"], text_len=onnx_meta.get("text_len"),
                    profiles=onnx_meta["profiles"], inputs=onnx_meta["inputs"], outputs=onnx_meta["outputs"],
                    toma=onnx_meta["toma"], plan=str(final / "engine.plan"), weights=onnx_meta["onnx"],
                    quantize=onnx_meta.get("quantize"))
        if options.weightless:
            meta.update(builder_flags=list(WEIGHTLESS[options.weightless]), plan_reused=False)
        kind = f"weightless plan ({' + '.join(meta['builder_flags'])})" if options.weightless else "engine"

        def make() -> bytes:
            progress(f"[build] building a {name} {backends.version(trt)} {kind}{f' for {target}' if target else ''}; "
                     f"selection: {describe_selection(selection, why)}")
            return _build_engine(trt, name, onnx_meta, target, options, use_plugin, capability, ptx_version)

        if options.weightless != "refit":
            return _write(final, meta, make, progress)
        shared = _shared_plan(out_root, fields, meta, make, force, trt, progress)
        with staged_dir(final) as tmp:
            link_or_copy(Path(shared["engine"]), tmp / "engine.plan")
            meta.update(plan=shared["engine"], build_seconds=shared["build_seconds"],
                        engine_bytes=shared["engine_bytes"], plan_reused=shared["plan_reused"])
            Artifact("engine", tmp / ENGINE_META, meta).save()
        progress(f"[build] wrote {final / ENGINE_META}: {meta['plan']}, refitted from {meta['weights']} at load")
        return meta


def build_controlled(model: str, controlnets, toma, output_dir=None, options: BuildOptions = BuildOptions(),
                     controlnet_toma: bool = True, force: bool = False, progress=None) -> dict:
    """The network taking ControlNet residuals and each ControlNet as engines, all on the network's recipe (sizes,
    dtype) and its text length; {"network": its engine.json, "controlnets": theirs}. Checked before any build."""
    from ..onnx.export import check_controlnets

    plan = recipe(model)
    sizes = {k: getattr(options, f"{k}_size") or tuple(plan["sizes"][k]) for k in ("min", "opt", "max")}
    options = replace(options, min_size=sizes["min"], opt_size=sizes["opt"], max_size=sizes["max"],
                      dtype=options.dtype or plan["dtype"])
    if options.weightless or options.part or options.quant:
        raise UsageError("ControlNet engines take no --weightless, --cache or --quantize yet")
    layout = check_controlnets(model, controlnets, ExportOptions(height=sizes["opt"][0], width=sizes["opt"][1],
                                                                 text_len=options.text_len))
    own = replace(options, loras=(), text_len=options.text_len or models.get(model).text_len)   # a LoRA: the network's
    metas = [build(name, toma if controlnet_toma else None, output_dir, own, force=force, progress=progress)
             for name in dict.fromkeys(controlnets)]
    network = build(model, toma, output_dir, replace(options, control=layout), force=force, progress=progress)
    return dict(network=network, controlnets=metas)


def _write(final: Path, meta: dict, make, progress) -> dict:
    """Build the plan and write it with its engine.json into `final` (staged, renamed when complete)."""
    t0 = time.perf_counter()
    engine = make()
    meta = dict(meta, engine=str(final / "engine.plan"), plan=str(final / "engine.plan"),
                build_seconds=round(time.perf_counter() - t0, 1), engine_bytes=len(engine))
    with staged_dir(final) as tmp:
        (tmp / "engine.plan").write_bytes(engine)
        Artifact("engine", tmp / ENGINE_META, meta).save()
    progress(f"[build] wrote {meta['engine']} ({len(engine) / 2**20:.1f} MiB) in {meta['build_seconds']:.0f} s")
    return meta


def graph_key(onnx_meta: dict) -> str:
    """The export's graph key (architecture, ToMA, dtype, shapes, opset, versions: not the weights); exports made
    before graphs and weights were keyed apart have only the whole key."""
    return onnx_meta.get("graph_key") or onnx_meta["key"]


def weights_key(onnx_meta: dict) -> str | None:
    return (onnx_meta.get("weights") or {}).get("key")


def check_weightless(name: str, trt, mode: str) -> None:
    """Refuse --weightless where it cannot be built, in one line, before anything is exported.

    TensorRT-RTX builds ordinary plans without a GPU, but its refit compiler calls the CUDA driver (1.7.1 fails
    with `MyelinCheckException: graph_jit.cpp: CHECK(status == CUDA_SUCCESS)`, even for a one-layer network).
    Where no driver library loads, a one-layer network is built with the mode's flags: if that fails, so would
    the real build, after the export."""
    if mode not in WEIGHTLESS:
        raise UsageError(f"--weightless must be one of {', '.join(WEIGHTLESS)}, got {mode!r}")
    missing = [f for f in WEIGHTLESS[mode] if not hasattr(trt.BuilderFlag, f)]
    if missing:
        raise MissingComponent(f"{name} {backends.version(trt)} has no BuilderFlag.{missing[0]}, which --weightless "
                               f"{mode} needs (TensorRT 10.0+ has it); drop --weightless or update {name}")
    from ..plugins import ptx

    if ptx.driver_cuda() is not None or _refit_probe(trt, mode):
        return
    raise MissingComponent(f"{name} {backends.version(trt)} cannot build a refittable plan on this machine: its refit "
                           "compiler calls the CUDA driver (libcuda), which is not installed here; build --weightless "
                           "on a machine with an NVIDIA driver, or drop --weightless")


def _refit_probe(trt, mode: str) -> bool:
    """Build a one-layer network (one constant weight, a MatMul) with the mode's flags: True if a plan came back.
    Its C++ messages go to /dev/null: the failure they describe is reported as one line by the caller."""
    import numpy as np

    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    x = network.add_input("x", trt.float32, (1, 8))
    weights = np.ones((8, 8), np.float32)          # kept alive until the build: TensorRT holds a pointer
    constant = network.add_constant((8, 8), trt.Weights(weights))
    product = network.add_matrix_multiply(x, trt.MatrixOperation.NONE, constant.get_output(0),
                                          trt.MatrixOperation.NONE)
    network.mark_output(product.get_output(0))
    config = builder.create_builder_config()
    for flag in WEIGHTLESS[mode]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    with _quiet_stderr():
        plan = builder.build_serialized_network(network, config)
    return plan is not None


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _shared_plan(out_root: Path, fields: dict, meta: dict, make, force: bool, trt, progress) -> dict:
    """The `refit` plan of this graph: built once, by whichever weight set comes first, into a folder keyed by the
    graph instead of the export (its engine.json names that weight set's ONNX), and reused by every other one."""
    folder = out_root / (f"{Path(meta['model']).name}-{fields['backend']}-refit-"
                         f"{cache_key(dict(fields, onnx=None, graph=meta['graph_key']))}")
    with claimed(folder, progress):
        if (folder / ENGINE_META).is_file() and not force:
            shared = check_engine(folder / ENGINE_META, trt_module=trt)
            progress(f"[build] reusing the weightless plan {folder} of graph {meta['graph_key']} (built in "
                     f"{shared['build_seconds']:.0f} s): nothing to build")
            return dict(shared, plan_reused=True)
        return _write(folder, meta, make, progress)


def _reuse(final: Path, trt, progress) -> dict:
    meta = check_engine(final / ENGINE_META, trt_module=trt)
    progress(f"[build] reusing {final} (selection: {meta['selection']})")
    return meta


def check_quant(mode: str, backend: str, target: str | None) -> None:
    """FP8 tensor cores begin with Ada (sm89); refuse an FP8 engine for an older GPU before exporting."""
    if mode != "fp8":
        return
    if backend == "tensorrt":
        import torch

        if not torch.cuda.is_available():
            return                        # the build itself says there is no GPU
        major, minor = torch.cuda.get_device_capability()
        target = f"sm{major}{minor}"
    if target and int(target[2:]) < 89:
        raise UsageError(f"--quantize fp8 needs a GPU with FP8 tensor cores (Ada, sm89, or later); this build targets "
                         f"{target}: use --quantize int8, or build for sm89 or later")


def _target(name: str, trt, target: str | None) -> str | None:
    if name == "tensorrt":
        if target:
            raise UsageError("--target applies to tensorrt-rtx only: TensorRT builds for the GPU it runs on")
        return None
    target = (target or "sm89").lower()
    if not hasattr(trt.ComputeCapability, target.upper()):
        known = [c.lower() for c in dir(trt.ComputeCapability) if c.startswith("SM")]
        raise UsageError(f"target {target!r} is not one TensorRT-RTX builds for; choose one of {', '.join(known)}")
    return target


def _build_engine(trt, name, onnx_meta, target, options: BuildOptions, use_plugin, capability, ptx_version) -> bytes:
    timing_cache = options.timing_cache
    logger = trt.Logger(trt.Logger.WARNING if options.verbose else trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)   # the graph's dtypes rule
    if use_plugin:
        from ..plugins import trt_plugin     # importing registers toma::ToMASelect

        trt_plugin.configure(capability=capability, ptx_version=ptx_version)
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # No OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE (10.15+ only, and it maps every node whose op_type matches any
    # registered plugin): parsers from 10.7 take a registered plugin over a same-named local function, and
    # 10.15+ do so for a node that carries `plugin_namespace`, which ours does.
    with contextlib.nullcontext() if use_plugin else _plugin_hidden(trt):
        parsed = parser.parse_from_file(onnx_meta["onnx"])
    if not parsed:
        errors = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 3)))
        raise BuildError(f"the {name} ONNX parser rejected {onnx_meta['onnx']}: {errors}")
    plugins = sum(network.get_layer(i).type == trt.LayerType.PLUGIN_V3 for i in range(network.num_layers))
    nodes = onnx_meta["toma"]["selection_nodes"] if onnx_meta["toma"] else 0
    if plugins != (nodes if use_plugin else 0):
        raise BuildError(f"the parser turned {plugins} of the {nodes} selection nodes into plugin layers, where "
                         f"{nodes if use_plugin else 0} were asked for; build with --selection body to inline the "
                         "ONNX body instead")
    config = builder.create_builder_config()
    if target:
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, target.upper()), 0)
    if onnx_meta["dynamic"]:
        profile = builder.create_optimization_profile()
        for input_name, shapes in onnx_meta["profiles"].items():
            profile.set_shape(input_name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
    for flag in WEIGHTLESS.get(options.weightless, ()):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    cache = None
    if timing_cache:
        path = Path(timing_cache)
        cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise BuildError(f"{name} could not build an engine from {onnx_meta['onnx']} (see the log above)")
    if cache is not None:
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(engine)


@contextlib.contextmanager
def _plugin_hidden(trt):
    """Keep a toma::ToMASelect plugin registered earlier in this process away from the parser, which would
    prefer it over the body that was asked for."""
    if "toma_export.plugins.trt_plugin" not in sys.modules:      # never registered here (and a registry lookup
        yield                                                    # of a missing plugin logs an error)
        return
    registry = trt.get_plugin_registry()
    creator = registry.get_creator("ToMASelect", "1", "toma")
    if creator is None:
        yield
        return
    registry.deregister_creator(creator)
    try:
        yield
    finally:
        registry.register_creator(creator, "toma")


def check_engine(engine_json, trt_module=None) -> dict:
    """The engine's metadata; refuses an engine whose TensorRT or plugin version differs from the installed
    ones."""
    meta = Artifact.load(engine_json, "engine").meta
    meta.setdefault("plan", meta["engine"])          # engines built before plan/weights were recorded held both
    meta.setdefault("weights", meta.get("onnx"))
    name, trt = (meta["backend"], trt_module) if trt_module else backends.load(meta["backend"])
    installed = backends.version(trt)
    if meta["backend_version"] != installed:
        raise EngineMismatch(f"{meta['engine']} was built by {meta['backend']} {meta['backend_version']} but "
                             f"{installed} is installed; rebuild it with `toma-export build --model {meta['model']}`")
    if meta.get("plugin_version") and meta["plugin_version"] != plugin_version():
        raise EngineMismatch(f"{meta['engine']} embeds toma plugin {meta['plugin_version']} but this toolkit has "
                             f"{plugin_version()}; rebuild it with `toma-export build --model {meta['model']}`")
    if meta.get("ptx_version"):
        from ..plugins import ptx

        cuda = ptx.driver_cuda()
        if cuda is not None and ptx.for_cuda(*cuda) < meta["ptx_version"]:
            raise EngineMismatch(f"{meta['engine']} embeds a PTX ISA {meta['ptx_version'] / 10:.1f} kernel, newer "
                                 f"than the CUDA {cuda[0]}.{cuda[1]} driver loads; rebuild it here (`toma-export "
                                 f"build --model {meta['model']}` picks the driver's version) or update the driver")
    return meta
