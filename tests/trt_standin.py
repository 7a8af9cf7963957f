"""Drive the toma::ToMASelect plugin through NVIDIA's own `tensorrt.plugin` package, as TensorRT would.

Run as a script in a fresh process (one per plugin-package version and phase); writes one JSON report.

Which layer is whose:
- NVIDIA's code: the whole `tensorrt.plugin` package (registration, the creator, the JIT and AOT plugin
  classes, ShapeExpr/SymInt32/KernelLaunchParams), taken unmodified from a `tensorrt-cu12-bindings` wheel.
- TensorRT-RTX's compiled bindings (real): DataType, PluginField(Collection), PluginTensorDesc,
  DynamicPluginTensorDesc, Dims, the IPluginV3* base classes, the plugin registry, Logger.
- Stand-ins, because full TensorRT's libraries cannot load here: the few AOT-only classes TensorRT-RTX lacks
  (QuickPluginCreationRequest, ISymExpr, IPluginV3QuickAOTBuild), the symbolic shape expressions
  (IDimensionExpr, IExprBuilder, DimsExprs) as a small evaluator, and the parser/builder call sequence
  below, written from the ONNX parser's sources (fields: the creator's declared names, INT as one int32,
  FLOAT as one float32; createPlugin(op_type, plugin_namespace, fields, BUILD, request)) and from
  NvInferRuntimePlugin.h (plugin tensors cannot be BOOL).
- Ours, under test: toma_export/plugins/trt_plugin.py and the Triton kernel it compiles or launches.

Imported by the engine tests, the module also holds the stand-ins for the GPU-only steps of a weightless
engine (`build --weightless`, "Refit" below): the builder's serialisation, which TensorRT-RTX cannot do for a
refittable plan without a CUDA driver, and deserialisation and refit, which need a GPU. Each stand-in class has
the real binding's method names and parameter names (tests/test_trt_runner.py compares them with
tensorrt_rtx's), and works on real objects wherever those exist without a GPU: TensorRT-RTX's ONNX parser,
network and builder config, its Logger and Weights, and the ONNX export itself.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import json
import operator
import os
import sys
import types
from pathlib import Path

import numpy as np


# -- symbolic dimension expressions (stand-in for TensorRT's IDimensionExpr / IExprBuilder) --
def make_symbolic(base):
    class Expr(base):
        """A dimension expression: a constant, a named symbol, or an operation on two expressions."""

        def __init__(self, fn, const=None, text="?"):
            self.fn, self.const, self.text = fn, const, text

        def is_constant(self):
            return self.const is not None

        def get_constant_value(self):
            if self.const is None:
                raise RuntimeError(f"{self.text} is not a build-time constant")
            return self.const

        def evaluate(self, env: dict) -> int:
            return self.fn(env)

        def __repr__(self):
            return self.text

    return Expr


def make_builder(trt, Expr):
    ops = {trt.DimensionOperation.SUM: operator.add, trt.DimensionOperation.PROD: operator.mul,
           trt.DimensionOperation.SUB: operator.sub, trt.DimensionOperation.FLOOR_DIV: operator.floordiv,
           trt.DimensionOperation.CEIL_DIV: lambda a, b: -(-a // b), trt.DimensionOperation.MAX: max,
           trt.DimensionOperation.MIN: min, trt.DimensionOperation.EQUAL: lambda a, b: int(a == b),
           trt.DimensionOperation.LESS: lambda a, b: int(a < b)}

    class ExprBuilder:
        def constant(self, value):
            return Expr(lambda env: value, const=int(value), text=str(value))

        def symbol(self, name):
            return Expr(lambda env: env[name], text=name)

        def operation(self, op, a, b):
            f = ops[op]
            const = f(a.const, b.const) if a.is_constant() and b.is_constant() else None
            return Expr(lambda env: f(a.evaluate(env), b.evaluate(env)), const, f"({a.text} {op.name} {b.text})")

    return ExprBuilder()


class DimsExprs(list):
    """TensorRT's DimsExprs: a fixed-length list of dimension expressions."""

    def __init__(self, n):
        super().__init__([None] * n)


class _Plain:
    def __init__(self, *args, **kwargs):
        pass


class _Request:
    """TensorRT's QuickPluginCreationRequest (10.9+), absent from TensorRT-RTX."""
    UNKNOWN, PREFER_JIT, PREFER_AOT, STRICT_JIT, STRICT_AOT = range(5)


def load_tensorrt(package_root: Path, version: str):
    """Make `import tensorrt` give TensorRT-RTX's bindings plus the stand-ins, and `tensorrt.plugin` NVIDIA's
    package from the wheel's folder `package_root` (which holds plugin/)."""
    import tensorrt_rtx as rtx

    trt = types.ModuleType("tensorrt")
    trt.__dict__.update({k: getattr(rtx, k) for k in dir(rtx) if not k.startswith("__")})
    trt.__version__ = version
    trt.__path__ = [str(package_root)]      # `tensorrt.plugin` is found in the wheel's folder
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None, is_package=True)
    trt.__spec__.submodule_search_locations = trt.__path__
    trt.QuickPluginCreationRequest = _Request
    trt.ISymExpr = type("ISymExpr", (_Plain,), {})
    trt.IPluginV3QuickAOTBuild = type("IPluginV3QuickAOTBuild", (_Plain,), {})
    trt.IDimensionExpr = type("IDimensionExpr", (), {})
    trt.DimsExprs = DimsExprs
    sys.modules["tensorrt"] = trt
    import tensorrt.plugin as trtp  # noqa: F401  (NVIDIA's package, importing against the stand-in)

    assert Path(sys.modules["tensorrt.plugin"].__file__).is_relative_to(package_root), "wrong tensorrt.plugin"
    return trt


# -- what the ONNX parser and the builder do with a QDP plugin node --
_KEEP: list = []


def parser_fields(trt, creator, node):
    """The PluginFieldCollection the ONNX parser builds: for each field name the creator declares, the node's
    attribute of that name (INT -> one int32, FLOAT -> one float32, STRING -> chars with the NUL)."""
    import onnx

    attrs = {a.name: a for a in node.attribute}
    fields, passed = [], []
    for declared in creator.field_names:
        a = attrs.get(declared.name)
        if a is None:
            continue                          # the parser warns and skips it
        if a.type == onnx.AttributeProto.INT:
            data, kind = np.array([a.i], dtype=np.int32), trt.PluginFieldType.INT32
        elif a.type == onnx.AttributeProto.FLOAT:
            data, kind = np.array([a.f], dtype=np.float32), trt.PluginFieldType.FLOAT32
        elif a.type == onnx.AttributeProto.STRING:
            data, kind = np.frombuffer(a.s + b"\0", dtype=np.int8), trt.PluginFieldType.CHAR
        else:
            raise AssertionError(f"attribute {a.name} of ONNX type {a.type} is not one the parser passes")
        _KEEP.append(data)                    # a PluginField points at its data; the parser owns that memory
        fields.append(trt.PluginField(a.name, data, kind))
        passed.append(a.name)
    return trt.PluginFieldCollection(fields), passed


def node_io(model, node):
    """(TensorRT dtype, rank) of each selection input and its output, from ONNX shape inference."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    infos = {v.name: v.type.tensor_type for v in [*inferred.graph.input, *inferred.graph.value_info,
                                                   *inferred.graph.output]}
    return [(infos[n].elem_type, len(infos[n].shape.dim)) for n in [*node.input, *node.output]]


def trt_dtype(trt, onnx_type):
    import onnx

    table = {onnx.TensorProto.FLOAT: trt.float32, onnx.TensorProto.FLOAT16: trt.float16,
             onnx.TensorProto.BFLOAT16: trt.bfloat16, onnx.TensorProto.INT32: trt.int32,
             onnx.TensorProto.INT64: trt.int64, onnx.TensorProto.BOOL: trt.bool}
    return table[onnx_type]


def tensor_desc(trt, dims, dtype):
    d = trt.PluginTensorDesc()
    d.dims, d.type, d.format = trt.Dims(list(dims)), dtype, trt.TensorFormat.LINEAR
    return d


def dynamic_desc(trt, dims, dtype):
    dd = trt.DynamicPluginTensorDesc()
    dd.desc = tensor_desc(trt, dims, dtype)
    dd.min = dd.max = dd.opt = trt.Dims(list(dims))
    return dd


class LaunchParams:
    """The builder's view of the AOT launch parameters (what get_launch_params writes into)."""
    grid_x = grid_y = grid_z = block_x = block_y = block_z = shared_mem = None


class SymExprSetter:
    def __init__(self):
        self.nbSymExprs, self.items = 0, {}

    def __setitem__(self, i, value):
        self.items[i] = value


def drive(args) -> dict:
    import onnx

    trt = load_tensorrt(Path(args.package), args.version)
    report = {"tensorrt_plugin": sys.modules["tensorrt.plugin"].__file__, "version": args.version}

    from toma_export.plugins import trt_plugin      # registers the plugin through NVIDIA's decorators

    trt_plugin.configure(capability=args.capability, ptx_version=args.ptx_version)
    creator = trt.get_plugin_registry().get_creator("ToMASelect", "1", "toma")
    report["registered"] = creator is not None
    report["declared_fields"] = [f.name for f in creator.field_names]

    model = onnx.load(args.onnx, load_external_data=False)
    node = next(n for n in model.graph.node if n.domain == "toma")
    report["node_attributes"] = [a.name for a in node.attribute]
    io = node_io(model, node)
    report["io_onnx_types"] = [onnx.TensorProto.DataType.Name(t) for t, _ in io]
    report["cases"] = {}
    for features in args.features.split(","):       # the node as exported, and at the engine dtypes
        types_in = [trt_dtype(trt, t) for t, _ in io[:3]]
        types_in[0] = getattr(trt, features)
        report["cases"][features] = build_plugin(trt, creator, node, types_in, [r for _, r in io[:3]], args)
    return report


def build_plugin(trt, creator, node, types_in, ranks, args) -> dict:
    """The parser's and builder's calls on one plugin instance, in TensorRT's order."""
    from toma_export.plugins import trt_plugin

    Expr = make_symbolic(trt.IDimensionExpr)
    builder = make_builder(trt, Expr)
    report = {}
    fc, report["passed_fields"] = parser_fields(trt, creator, node)
    request = _Request.PREFER_JIT if args.phase == "jit" else _Request.PREFER_AOT
    plugin = creator.create_plugin(node.op_type, "toma", fc, trt.TensorRTPhase.BUILD, request)
    report["plugin_class"] = type(plugin).__name__
    report["attrs"] = {k: [type(v).__name__, str(getattr(v, "dtype", "")), np.asarray(v).tolist()]
                       for k, v in plugin.attrs.items()}

    # shapes: batch B and tile count T symbolic, tile size n and channels C constant (as exported)
    n, c, d = args.tile_tokens, args.channels, trt_plugin._scalar(plugin.attrs["num_dst"])
    B, T = builder.symbol("B"), builder.symbol("T")
    in_exprs = [DimsExprs(4), DimsExprs(3), DimsExprs(1)]
    in_exprs[0][:] = [B, T, builder.constant(n), builder.constant(c)]
    in_exprs[1][:] = [B, T, builder.constant(d)]
    in_exprs[2][:] = [builder.constant(1)]
    assert [len(e) for e in in_exprs] == ranks, f"ranks {ranks} differ from the exported node's"
    report["num_outputs"] = plugin.get_num_outputs()
    out_types = plugin.get_output_data_types(types_in, ranks)
    report["output_types"] = [str(t) for t in out_types]
    out_exprs = plugin.get_output_shapes(in_exprs, [], builder)
    env = {"B": args.batch, "T": args.tiles}
    report["output_shape"] = [e.evaluate(env) for e in out_exprs[0]]

    dims = [(args.batch, args.tiles, n, c), (args.batch, args.tiles, d), (1,)]
    in_out = [dynamic_desc(trt, s, t) for s, t in zip(dims, types_in)]
    in_out.append(dynamic_desc(trt, report["output_shape"], out_types[0]))
    combos = plugin.get_supported_format_combinations(in_out, 3)
    report["io_types"] = [str(x.type) for x in combos]
    bad = [str(x.type) for x in combos if x.type in (trt.bool, trt.uint8)]
    assert not bad, f"plugin tensors cannot be {bad} (NvInferRuntimePlugin.h: PluginTensorDesc::type)"
    plugin.configure_plugin(in_out[:3], in_out[3:])
    plugin.set_tactic(0)

    if args.phase == "aot":
        params, setter = LaunchParams(), SymExprSetter()
        plugin.get_launch_params(in_exprs, in_out, 3, params, setter, builder)
        report["launch"] = {k: getattr(params, k).expr.evaluate(env) for k in
                            ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")}
        report["extra_args"] = [[setter.items[i].expr.evaluate(env), str(setter.items[i].dtype)]
                                for i in range(setter.nbSymExprs)]
        name, ptx = plugin.get_kernel([x.desc for x in in_out[:3]], [in_out[3].desc])
        report["kernel_name"] = name.decode() if isinstance(name, bytes) else name
        report["ptx"] = ptx.decode()
    else:
        report["jit"] = run_jit(trt, plugin, dims, types_in, out_types, report["output_shape"])
        report["serialized_fields"] = [f.name for f in plugin.get_fields_to_serialize()]
    return report


def run_jit(trt, plugin, dims, types_in, out_types, out_shape) -> dict:
    """enqueue() on host buffers: NVIDIA's JIT plugin class calls our impl, which runs the Triton kernel
    under TRITON_INTERPRET=1. The outputs are compared with the PyTorch reference greedy."""
    import torch

    from toma_export import facility_location

    torch_types = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                   trt.int32: torch.int32, trt.int64: torch.int64}
    b, t, n, c = dims[0]
    d = dims[1][-1]
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(b * t, 3, c, generator=g)
    owner = torch.randint(0, 3, (b * t, n), generator=g)
    feats = (centres.gather(1, owner.unsqueeze(-1).expand(-1, -1, c)) + 0.05 * torch.randn(b * t, n, c, generator=g))
    tiles = feats.reshape(b, t, n, c).to(torch_types[types_in[0]]).contiguous()
    previous = torch.randint(0, n, dims[1], generator=g).to(torch_types[types_in[1]])
    result = {}
    for flag in (1, 0):
        recompute = torch.tensor([flag], dtype=torch_types[types_in[2]])
        out = torch.full(out_shape, -1, dtype=torch_types[out_types[0]])
        ins = [tiles, previous, recompute]
        plugin.enqueue([tensor_desc(trt, x.shape, ty) for x, ty in zip(ins, types_in)],
                       [tensor_desc(trt, out.shape, out_types[0])], [x.data_ptr() for x in ins], [out.data_ptr()],
                       [x.stride() for x in ins], [out.stride()], 0)
        want = facility_location(tiles.reshape(b * t, n, c), d).reshape(out_shape) if flag else previous
        result["recompute" if flag else "reuse"] = bool(torch.equal(out.to(torch.int64), want.to(torch.int64)))
    return result


# -- Refit: stand-ins for the GPU-only steps of a weightless engine (build --weightless, runtime/tensorrt.py) --
STANDIN_PLAN = b"stand-in for a weight-stripped plan: TensorRT-RTX cannot serialise a refittable one without libcuda"
WATCHED_FLAGS = ("REFIT", "REFIT_IDENTICAL", "REFIT_INDIVIDUAL", "STRIP_PLAN")


def recording_builder(real_builder, builds: list):
    """A trt.Builder whose build_serialized_network records the real IBuilderConfig's flags (set by our build code
    on TensorRT-RTX's real config, for the network its real ONNX parser made) and returns STANDIN_PLAN; every
    other call goes to the real builder."""
    import tensorrt_rtx as trt

    class Builder:
        def __init__(self, logger):
            self._real = real_builder(logger)

        def __getattr__(self, name):
            return getattr(self._real, name)

        def build_serialized_network(self, network, config):
            builds.append(dict(flags={f: config.get_flag(getattr(trt.BuilderFlag, f)) for f in WATCHED_FLAGS},
                               layers=network.num_layers, profiles=config.num_optimization_profiles))
            return STANDIN_PLAN

    return Builder


def as_if_a_cuda_driver(monkeypatch, exports: list) -> list:
    """Make toma_export's build run weightless builds as on a machine with a CUDA driver: the driver check passes,
    TensorRT-RTX's builder serialises STANDIN_PLAN (see recording_builder), and each build takes its export from
    the front of `exports` instead of exporting. Returns the list that records each real build call."""
    import importlib

    import tensorrt_rtx as trt

    build = importlib.import_module("toma_export.trt.build")
    ptx = importlib.import_module("toma_export.plugins.ptx")
    builds: list = []
    monkeypatch.setattr(trt, "Builder", recording_builder(trt.Builder, builds))
    monkeypatch.setattr(ptx, "driver_cuda", lambda: (12, 8))
    monkeypatch.setattr(build, "export_in_child", lambda *args, **kwargs: exports.pop(0))
    return builds


def export_with_other_weights(base: dict, folder: Path, scale: float = 2.0) -> dict:
    """A second export of `base`'s graph with other weights, as a LoRA or a fine-tune gives: model.onnx copied byte
    for byte, each weight in model.onnx.data multiplied by `scale` at its recorded offset, and toma.json with the
    same graph key but another weights key (and so another export key)."""
    import shutil

    import onnx

    from toma_export.artifacts import Artifact

    src = Path(base["onnx"])
    folder.mkdir(parents=True)
    shutil.copyfile(src, folder / "model.onnx")
    data = bytearray((src.parent / "model.onnx.data").read_bytes())
    for tensor in onnx.load(str(src), load_external_data=False).graph.initializer:
        info = {e.key: e.value for e in tensor.external_data}
        offset, length = int(info.get("offset", 0)), int(info["length"])
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        values = np.frombuffer(bytes(data[offset:offset + length]), dtype=dtype) * np.asarray(scale, dtype)
        data[offset:offset + length] = values.astype(dtype).tobytes()
    (folder / "model.onnx.data").write_bytes(bytes(data))
    graph = base.get("graph_key") or base["key"]
    weights = dict(base.get("weights") or {}, key=f"x{scale:g}")
    meta = dict(base, key=f"{graph}-x{scale:g}", graph_key=graph, onnx=str(folder / "model.onnx"), weights=weights)
    Artifact("onnx", folder / "model.onnx", meta).save()
    return meta


def weight_names(onnx_path) -> list[str]:
    """The initializers of an export (every one a weight named by its state_dict key): what the engine refits."""
    import onnx

    return [t.name for t in onnx.load(str(onnx_path), load_external_data=False).graph.initializer]


class StandinEngine:
    """ICudaEngine, as far as a refit goes: whether it is refittable, and the weights it holds once refitted."""

    def __init__(self, needs, refittable=True):
        self._needs, self._refittable = list(needs), refittable
        self.refits = []             # one {name: numpy array} per refit_cuda_engine

    @property
    def refittable(self):
        return self._refittable

    def create_execution_context(self, strategy=None):
        return object()


class StandinRuntime:
    """trt.Runtime: deserialize_cuda_engine gives a new StandinEngine for STANDIN_PLAN (None for anything else,
    as TensorRT gives for bytes it cannot read)."""

    needs: list = []                 # set by the test: the weights the plan's engine holds
    refittable = True
    engines: list = []

    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine):
        if bytes(serialized_engine) != STANDIN_PLAN:
            return None
        engine = StandinEngine(type(self).needs, type(self).refittable)
        type(self).engines.append(engine)
        return engine


class StandinRefitter:
    """trt.Refitter: takes named weights, knows which of the engine's are still missing, refits."""

    fail_refit = False

    def __init__(self, engine, logger):
        self.engine, self.logger, self.given = engine, logger, {}

    def set_named_weights(self, name, weights):
        import tensorrt_rtx as trt

        assert isinstance(weights, trt.Weights), "the refitter takes TensorRT Weights"
        if name not in self.engine._needs:
            return False
        self.given[name] = weights.numpy().copy()
        return True

    def get_all_weights(self):
        return list(self.engine._needs)

    def get_missing_weights(self):
        return [n for n in self.engine._needs if n not in self.given]

    def refit_cuda_engine(self):
        if self.get_missing_weights() or type(self).fail_refit:
            return False
        self.engine.refits.append(dict(self.given))
        return True


class StandinParserError(str):
    """trt.ParserError, as far as str() of it goes."""


class StandinOnnxParserRefitter:
    """trt.OnnxParserRefitter: reads the ONNX file (its external data too, with onnx) and sets every initializer
    the engine holds as real TensorRT Weights. Like TensorRT's, refit_from_file is True only if every weight of
    the engine was set."""

    def __init__(self, refitter, logger):
        self.refitter, self.logger, self.errors = refitter, logger, []

    def refit_from_file(self, model):
        import tensorrt_rtx as trt

        from toma_export.onnx.weights import arrays

        try:
            weights = arrays(model)            # at their recorded offsets, hard-linked files too, as TensorRT reads
        except Exception as err:     # noqa: BLE001  (TensorRT reports a parse failure as an error, not a raise)
            self.errors.append(StandinParserError(f"cannot load {model}: {err}"))
            return False
        for name, array in weights.items():
            self.refitter.set_named_weights(name, trt.Weights(np.ascontiguousarray(array)))
        return not self.refitter.get_missing_weights()

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, index):
        return self.errors[index]

    def clear_errors(self):
        self.errors.clear()


STANDINS = {"Runtime": StandinRuntime, "ICudaEngine": StandinEngine, "Refitter": StandinRefitter,
            "OnnxParserRefitter": StandinOnnxParserRefitter}


def refit_module():
    """`tensorrt_rtx` with its real bindings, but the GPU-only classes replaced by the stand-ins above."""
    import tensorrt_rtx as real

    module = types.ModuleType("tensorrt_rtx")
    module.__dict__.update({k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
    module.__version__ = real.__version__
    module.__dict__.update(STANDINS)
    return module


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package", required=True, help="folder holding NVIDIA's plugin/ package (from the wheel)")
    p.add_argument("--version", required=True, help="the TensorRT version that wheel belongs to")
    p.add_argument("--onnx", required=True, help="an exported ToMA model: its toma::ToMASelect node is parsed")
    p.add_argument("--phase", choices=("aot", "jit"), required=True)
    p.add_argument("--features", default="float32,bfloat16", help="comma list of feature dtypes to build for")
    p.add_argument("--tile-tokens", type=int, default=16)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tiles", type=int, default=12)
    p.add_argument("--capability", type=int, default=90)
    p.add_argument("--ptx-version", type=int, default=84)
    p.add_argument("--report", required=True, help="JSON file to write (TensorRT's logger owns stdout)")
    args = p.parse_args()
    report = drive(args)
    Path(args.report).write_text(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
