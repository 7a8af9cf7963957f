"""`toma-export build`: export (or reuse) the ONNX file, then build a TensorRT or TensorRT-RTX engine.

With full TensorRT the `toma::ToMASelect` plugin is registered and preferred in its ahead-of-time form,
so the engine embeds the Triton kernel's PTX and runs without Python. TensorRT-RTX cannot load plugins:
its parser inlines the op's portable ONNX body instead. The engine folder's key covers the ONNX key, the
backend and its version, the plugin version and the target, and engine.json records them so that an
engine is never used by a TensorRT or plugin it was not built with.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import models
from ..artifacts import cache_key, staged_dir, writable_dir
from ..onnx import ExportOptions, export
from ..toma import ToMAConfig
from . import backend as backends

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "engines"
DEFAULT_OUTPUT = RECIPES / "out"
PLUGIN_SOURCES = ROOT / "plugins"


class BuildError(RuntimeError):
    """The parser or builder refused the network."""


class EngineMismatch(RuntimeError):
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
    timing_cache: str | None = None
    verbose: bool = False          # TensorRT warnings (duplicate inlined node names, int64 bindings...) too


def recipe(model: str) -> dict:
    """The build recipe for a registered model, or defaults for its family (local folders)."""
    spec = models.get(model)
    path = RECIPES / f"{spec.name}.json"
    if not path.is_file():
        path = RECIPES / f"{spec.family}.json"
    data = json.loads(path.read_text())
    data["model"] = model
    return data


def plugin_version() -> str:
    """Version of the selection plugin: a hash of its kernel and plugin sources."""
    digest = hashlib.sha256()
    for name in ("select_kernel.py", "trt_plugin.py"):
        digest.update((PLUGIN_SOURCES / name).read_bytes())
    return "1." + digest.hexdigest()[:10]


def build(model: str, toma: ToMAConfig | None, output_dir=None, options: BuildOptions = BuildOptions(),
          force: bool = False, progress=None) -> dict:
    """Build (or reuse) the engine; returns the metadata written beside it as engine.json.

    `toma=None` builds the baseline without ToMA."""
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    name, trt = backends.load(options.backend)
    target = _target(name, trt, options.target)
    plan = recipe(model)
    sizes = {k: getattr(options, f"{k}_size") or tuple(plan["sizes"][k]) for k in ("min", "opt", "max")}
    dtype = options.dtype or plan["dtype"]
    out_root = writable_dir(output_dir or DEFAULT_OUTPUT)

    onnx_meta = export(model, toma, out_root / "onnx", ExportOptions(
        height=sizes["opt"][0], width=sizes["opt"][1], dynamic=not options.static, dtype=dtype,
        min_size=None if options.static else sizes["min"], max_size=None if options.static else sizes["max"]),
        force=force, progress=progress)
    use_plugin = name == "tensorrt" and onnx_meta["toma"] is not None
    fields = dict(onnx=onnx_meta["key"], backend=name, backend_version=backends.version(trt),
                  plugin_version=plugin_version() if use_plugin else None, target=target)
    final = out_root / f"{Path(onnx_meta['model']).name}-{name}-{cache_key(fields)}"
    if (final / "engine.json").is_file() and not force:
        meta = json.loads((final / "engine.json").read_text())
        check_engine(final / "engine.json", trt_module=trt)
        progress(f"[build] reusing {final}")
        return meta

    progress(f"[build] building a {name} {backends.version(trt)} engine"
             f"{f' for {target}' if target else ''} ({'plugin' if use_plugin else 'inlined ONNX body'} runs the "
             "selection)")
    t0 = time.perf_counter()
    engine, selection = _build_engine(trt, name, onnx_meta, target, options, use_plugin)
    with staged_dir(final) as tmp:
        (tmp / "engine.plan").write_bytes(engine)
        meta = dict(fields, model=onnx_meta["model"], engine=str(final / "engine.plan"), onnx=onnx_meta["onnx"],
                    onnx_key=onnx_meta["key"], selection=selection, dtype=dtype, dynamic=onnx_meta["dynamic"],
                    profiles=onnx_meta["profiles"], inputs=onnx_meta["inputs"], outputs=onnx_meta["outputs"],
                    toma=onnx_meta["toma"], build_seconds=round(time.perf_counter() - t0, 1),
                    engine_bytes=len(engine))
        (tmp / "engine.json").write_text(json.dumps(meta, indent=2))
    progress(f"[build] wrote {meta['engine']} ({len(engine) / 2**20:.1f} MiB) in {meta['build_seconds']:.0f} s")
    return meta


def _target(name: str, trt, target: str | None) -> str | None:
    if name == "tensorrt":
        if target:
            raise ValueError("--target applies to tensorrt-rtx only: TensorRT builds for the GPU it runs on")
        return None
    target = (target or "sm89").lower()
    if not hasattr(trt.ComputeCapability, target.upper()):
        known = [c.lower() for c in dir(trt.ComputeCapability) if c.startswith("SM")]
        raise ValueError(f"target {target!r} is not one TensorRT-RTX builds for; choose one of {', '.join(known)}")
    return target


def _build_engine(trt, name, onnx_meta, target, options: BuildOptions, use_plugin) -> tuple[bytes, str]:
    timing_cache = options.timing_cache
    logger = trt.Logger(trt.Logger.WARNING if options.verbose else trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)   # the graph's dtypes rule
    if use_plugin:
        import toma_export.plugins.trt_plugin  # noqa: F401  (registers toma::ToMASelect)
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if use_plugin:
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    if not parser.parse_from_file(onnx_meta["onnx"]):
        errors = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 3)))
        raise BuildError(f"the {name} ONNX parser rejected {onnx_meta['onnx']}: {errors}")
    plugins = sum(network.get_layer(i).type == trt.LayerType.PLUGIN_V3 for i in range(network.num_layers))
    if use_plugin and plugins != onnx_meta["toma"]["selection_nodes"]:
        raise BuildError(f"the toma::ToMASelect plugin took {plugins} of {onnx_meta['toma']['selection_nodes']} "
                         "selection nodes; is the plugin registered for this TensorRT version?")
    config = builder.create_builder_config()
    if target:
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, target.upper()), 0)
    if onnx_meta["dynamic"]:
        profile = builder.create_optimization_profile()
        for input_name, shapes in onnx_meta["profiles"].items():
            profile.set_shape(input_name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
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
    selection = ("plugin (AOT Triton kernel)" if use_plugin else
                 "inlined ONNX body" if onnx_meta["toma"] else "none (ToMA off)")
    return bytes(engine), selection


def check_engine(engine_json, trt_module=None) -> dict:
    """Refuse an engine whose TensorRT or plugin version differs from the installed ones."""
    meta = json.loads(Path(engine_json).read_text())
    name, trt = (meta["backend"], trt_module) if trt_module else backends.load(meta["backend"])
    installed = backends.version(trt)
    if meta["backend_version"] != installed:
        raise EngineMismatch(f"{meta['engine']} was built by {meta['backend']} {meta['backend_version']} but "
                             f"{installed} is installed; rebuild it with `toma-export build --model {meta['model']}`")
    if meta.get("plugin_version") and meta["plugin_version"] != plugin_version():
        raise EngineMismatch(f"{meta['engine']} embeds toma plugin {meta['plugin_version']} but this toolkit has "
                             f"{plugin_version()}; rebuild it with `toma-export build --model {meta['model']}`")
    return meta
