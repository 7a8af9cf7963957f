"""ONNX export of both tiny models: one dynamic file each, run by ONNX Runtime at two sizes against the
eager PyTorch reference with destinations forced equal; the selection body on its own; file hygiene."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import toma_export as te
from toma_export.onnx import ExportOptions, ToMAGraph, export
from toma_export.onnx.graph import RECOMPUTE
from toma_export.toma.selection import facility_location, recompute_flag

MODELS = ["flux-tiny", "sdxl-tiny"]


def reference(name, batch, height, width, seed=0):
    """Eager ToMAGraph outputs with fresh destinations, and the inputs that produced them."""
    spec = te.models.get(name)
    model = spec.load()
    graph = ToMAGraph(model, spec, te.apply_toma(model, te.ToMAConfig())).eval()
    net = spec.graph_inputs(batch=batch, height=height, width=width, seed=seed, smooth=True)
    toma = graph.sample_toma_inputs(net, recompute=True)
    outs = graph(*net.values(), *toma.values())
    return graph, net, toma, outs


def feed(graph, net, toma):
    return {name: t.numpy() for name, t in zip(graph.input_names, [*net.values(), *toma.values()])}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch,size", [(2, (256, 256)), (1, (192, 320))])
def test_dynamic_file_matches_torch_with_forced_destinations(dynamic_export, name, batch, size):
    meta = dynamic_export(name)
    session = ort.InferenceSession(meta["onnx"], providers=["CPUExecutionProvider"])
    graph, net, toma, (ref, *ref_dst) = reference(name, batch, *size)
    forced = dict(toma)
    forced.update({n: d for n, d in zip(graph.input_names[len(net):-1], ref_dst)})
    forced[RECOMPUTE] = recompute_flag(False)
    out, *used = session.run(None, feed(graph, net, forced))
    assert out.shape == tuple(ref.shape)
    scale = ref.abs().max().item()
    assert np.abs(out - ref.numpy()).max() <= 1e-4 * scale          # fp32: export costs nothing measurable
    for u, d in zip(used, ref_dst):
        assert np.array_equal(u, d.numpy())                          # reused destinations pass through
    # and with the graph selecting on its own, the picks agree with the reference on these smooth inputs
    out2, *picked = session.run(None, feed(graph, net, toma))
    agree = np.mean([np.mean(p == d.numpy()) for p, d in zip(picked, ref_dst)])
    assert agree > 0.97
    if agree == 1.0:
        assert np.abs(out2 - ref.numpy()).max() <= 1e-4 * scale


@pytest.mark.parametrize("name", MODELS)
def test_file_is_well_formed_and_carries_the_custom_op(dynamic_export, name):
    meta = dynamic_export(name)
    onnx.checker.check_model(meta["onnx"], full_check=True)
    model = onnx.load(meta["onnx"])
    assert model.ir_version <= 10 and meta["external_data"]
    nodes = [n for n in model.graph.node if n.domain == "toma"]
    assert len(nodes) == len(meta["toma"]["groups"]) == meta["toma"]["selection_nodes"]
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.op_type == "ToMASelect"
        assert attrs["plugin_namespace"] == b"toma" and attrs["plugin_version"] == b"1" and attrs["num_dst"] == 8
    (fn,) = model.functions
    assert (fn.domain, fn.name) == ("toma", "ToMASelect")
    body_ops = {n.op_type for n in fn.node}
    assert not body_ops & {"Loop", "Scan", "TopK", "ScatterND", "ScatterElements"}
    assert sum(n.op_type == "ArgMax" for n in fn.node) == 8          # unrolled: one pick per destination
    shapes = {i["name"]: i["shape"] for i in meta["inputs"]}
    assert shapes["toma_dst.transformer_blocks" if name == "flux-tiny" else
                  "toma_dst.down_blocks.1.attentions.0"][0] == "batch"
    # TensorRT plugins take no bool tensors: the flag is int32 [1] from the graph input to every selection node
    recompute = next(i for i in meta["inputs"] if i["name"] == "toma_recompute")
    assert (recompute["dtype"], recompute["shape"]) == ("int32", [1])
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*onnx.shape_inference.infer_shapes(model).graph.value_info, *model.graph.input]}
    for node in nodes:
        assert [types[i] for i in node.input][1:] == [onnx.TensorProto.INT64, onnx.TensorProto.INT32]
        assert types[node.input[0]] == onnx.TensorProto.FLOAT
    assert meta["profiles"][meta["inputs"][0]["name"]]["max"][0] == 4


def _select_model(fn, d):
    h = onnx.helper
    node = h.make_node("ToMASelect", ["tiles", "prev", "rec"], ["dst"], domain="toma", plugin_namespace="toma",
                       plugin_version="1", num_dst=d)
    graph = h.make_graph([node], "select", [
        h.make_tensor_value_info("tiles", onnx.TensorProto.FLOAT, ["B", "T", "n", "C"]),
        h.make_tensor_value_info("prev", onnx.TensorProto.INT64, ["B", "T", d]),
        h.make_tensor_value_info("rec", onnx.TensorProto.INT32, [1])],
        [h.make_tensor_value_info("dst", onnx.TensorProto.INT64, ["B", "T", d])])
    model = h.make_model(graph, functions=[fn], ir_version=10,
                         opset_imports=[h.make_opsetid("", 20), h.make_opsetid("toma", 1)])
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString())


def test_selection_body_equals_the_reference(dynamic_export):
    fn = onnx.load(dynamic_export("flux-tiny")["onnx"]).functions[0]
    session = _select_model(fn, 8)
    g = torch.Generator().manual_seed(0)
    # structured: each 16-token tile is made of 8 clusters plus noise; and plain Gaussian tiles
    centres = torch.randn(2, 32, 8, 12, generator=g)
    owner = torch.randint(0, 8, (2, 32, 16), generator=g)
    noise = 0.05 * torch.randn(2, 32, 16, 12, generator=g)        # seeded: near-ties must not depend on test order
    clustered = centres.gather(2, owner.unsqueeze(-1).expand(-1, -1, -1, 12)) + noise
    for tiles in (clustered, torch.randn(2, 32, 16, 12, generator=g)):
        want = facility_location(tiles.reshape(-1, 16, 12), 8).reshape(2, 32, 8).numpy()
        got = session.run(None, {"tiles": tiles.numpy(), "prev": np.zeros_like(want), "rec": np.array([1], np.int32)})[0]
        assert np.array_equal(got, want)
        kept = session.run(None, {"tiles": tiles.numpy(), "prev": want[:, ::-1].copy(), "rec": np.array([0], np.int32)})[0]
        assert np.array_equal(kept, want[:, ::-1])


def cli(*args):
    return subprocess.run([sys.executable, "-m", "toma_export.cli", *args], capture_output=True, text=True,
                          timeout=900)


@pytest.mark.parametrize("name", ["flux-tiny"])     # sdxl-tiny's CLI export: test_artifacts, test_controlnet
def test_cli_export_json_and_reuse(tmp_path, name, cli_here):
    res = cli("export", "--model", name, "--ratio", "0.5", "--output-dir", str(tmp_path), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads(res.stdout)                                      # stdout holds the JSON alone
    assert Path(meta["onnx"]).is_file() and meta["toma"]["ratio"] == 0.5
    assert {i["name"] for i in meta["inputs"]} >= {"toma_recompute"} and meta["outputs"][0]["name"] == "noise_pred"
    assert "[export 4/4]" in res.stderr
    assert Path(meta["onnx"]).parent.parent == tmp_path / "onnx"     # where build, validate and generate look
    assert meta["peak_rss_gb"] > 0.1 and meta["peak_rss_children_gb"] == 0     # exported in this process
    assert "peak_rss_gb" not in json.loads((Path(meta["onnx"]).parent / "toma.json").read_text())   # not metadata
    assert not list(tmp_path.rglob(".*tmp*"))
    again = cli_here("export", "--model", name, "--ratio", "0.5", "--output-dir", str(tmp_path), "--json")
    assert json.loads(again.stdout)["key"] == meta["key"] and "reusing" in again.stderr
    if name == "flux-tiny":   # polygraphy runs the file as is (dst values kept within a 16-token tile)
        ranges = [f"{i['name']}:[0,15]" for i in meta["inputs"] if i["name"].startswith("toma_dst.")]
        poly = subprocess.run([str(Path(sys.executable).parent / "polygraphy"), "run", meta["onnx"], "--onnxrt",
                               "--val-range", *ranges], capture_output=True, text=True, timeout=300)
        assert poly.returncode == 0 and "PASSED" in poly.stdout + poly.stderr, poly.stdout[-2000:] + poly.stderr[-2000:]


@pytest.mark.parametrize("args,message", [
    (["--model", "flux-tiny", "--ratio", "-0.5"], "ratio must be in [0, 1)"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--model", "sdxl-tiny", "--height", "288"], "tile 4x4 does not divide the 18x8 token grid"),
    (["--model", "flux-tiny", "--opset", "23"], "opset must be between 17 and 22"),
    (["--model", "flux-tiny", "--dynamic", "--min-size", "96x96"], "the height must be a multiple of 64 px"),
])
def test_bad_export_input_is_one_clear_line(tmp_path, args, message, cli_here):
    res = cli_here("export", *args, "--output-dir", str(tmp_path))
    assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("toma-export: error:")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_unwritable_output_dir(tmp_path, cli_here):
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = cli_here("export", "--model", "flux-tiny", "--output-dir", str(blocker / "sub"))
    assert res.returncode == 2 and "is not writable" in res.stderr


def test_interrupted_export_leaves_no_final_file(tmp_path, monkeypatch):
    """The model writer is stood in for by one that dies half-way through the data file, and the trace before
    it by a placeholder (the folder is staged after the trace): what is under test is the staging of the
    artifact folder."""
    export_module = sys.modules["toma_export.onnx.export"]
    written = []

    def dying(program, path, *a, **k):
        Path(str(path) + ".data").write_bytes(b"half the weights")
        written.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "trace", lambda *a, **k: "a traced program")
    monkeypatch.setattr(export_module, "write_model", dying)
    with pytest.raises(KeyboardInterrupt):
        export("flux-tiny", te.ToMAConfig(), tmp_path, progress=lambda m: None)
    assert written and written[0].parent.parent == tmp_path          # it was writing inside the output folder
    assert list(tmp_path.iterdir()) == []


def test_fp16_sdxl_runs_in_onnxruntime_close_to_the_fp32_reference(tmp_path):
    meta = export("sdxl-tiny", te.ToMAConfig(), tmp_path, ExportOptions(dtype="fp16"), progress=lambda m: None)
    assert {i["dtype"] for i in meta["inputs"] if i["name"] in ("sample", "encoder_hidden_states")} == {"float16"}
    graph, net, toma, (ref, *ref_dst) = reference("sdxl-tiny", 1, 128, 128)          # the default size
    forced = {**toma, **dict(zip(graph.input_names[len(net):-1], ref_dst)), RECOMPUTE: recompute_flag(False)}
    feeds = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in feed(graph, net, forced).items()}
    out = ort.InferenceSession(meta["onnx"]).run(None, feeds)[0]
    assert out.dtype == np.float16
    assert np.abs(out.astype(np.float32) - ref.numpy()).max() <= 0.05 * ref.abs().max().item()


def test_bf16_flux_export_is_well_formed(tmp_path):
    """bf16 is the FLUX engine dtype; ONNX Runtime CPU has no bf16 kernels, so only the file is checked here."""
    meta = export("flux-tiny", te.ToMAConfig(), tmp_path, ExportOptions(dtype="bf16"), progress=lambda m: None)
    onnx.checker.check_model(meta["onnx"], full_check=True)
    assert next(i for i in meta["inputs"] if i["name"] == "hidden_states")["dtype"] == "bfloat16"


def test_weights_are_traced_on_meta_and_streamed_under_their_keys(tmp_path, monkeypatch):
    """The network is traced with every parameter on the meta device; each initializer is then named by its
    state_dict key and stored in model.onnx.data (none inline), holding exactly that weight's bytes; ONNX
    Runtime runs the file as the eager network does."""
    from onnx import numpy_helper

    from toma_export.onnx import weights as weights_module

    export_module = sys.modules["toma_export.onnx.export"]
    traced = []
    real_trace = export_module.trace
    monkeypatch.setattr(export_module, "trace", lambda module, *a, **k: traced.append(
        {p.device.type for p in module.parameters()}) or real_trace(module, *a, **k))
    meta = export("flux-tiny", te.ToMAConfig(), tmp_path, ExportOptions(height=128, width=128), progress=lambda m: None)
    assert traced == [{"meta"}]
    onnx.checker.check_model(meta["onnx"], full_check=True)
    model = onnx.load(meta["onnx"], load_external_data=False)
    weights = te.models.get("flux-tiny").load().state_dict()
    inits = {t.name: t for t in model.graph.initializer}
    assert set(inits) == set(weights)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in inits.values())
    data = Path(meta["onnx"] + ".data")
    summary = {k: meta["weights"][k] for k in ("file", "files", "tensors", "bytes", "written", "linked", "source")}
    total = sum(w.numel() * w.element_size() for w in weights.values())
    assert meta["external_data"] and summary == dict(file=data.name, files=[data.name], tensors=len(weights),
                                                     bytes=total, written=total, linked=[],
                                                     source=te.models.get("flux-tiny").base_label())
    assert total <= data.stat().st_size < total + weights_module.ALIGN * len(weights)     # aligned, no more
    for key, tensor in inits.items():
        stored = numpy_helper.to_array(tensor, base_dir=str(data.parent))
        assert np.array_equal(stored, weights[key].numpy()), key
    graph, net, toma, (ref, *_) = reference("flux-tiny", 1, 128, 128)
    out = ort.InferenceSession(meta["onnx"]).run(None, feed(graph, net, toma))[0]
    assert np.abs(out - ref.numpy()).max() <= 1e-4 * ref.abs().max().item()


def test_weight_files_are_read_per_tensor_in_pieces_or_converted(tmp_path, monkeypatch):
    """A sharded safetensors folder read through WeightSource: a tensor in the wanted dtype comes as its stored
    bytes in pieces (CHUNK made 7 bytes here), one in another dtype converted as torch converts it; either way
    the bytes equal the tensor's."""
    from safetensors.torch import save_file

    from toma_export import weightfiles as weights

    monkeypatch.setattr(weights, "CHUNK", 7)
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(5, 3, generator=g).to(torch.bfloat16), "b.bias": torch.randn(4, generator=g),
               "c.weight": torch.randn(2, 2, 2, generator=g).half()}
    save_file({k: tensors[k] for k in ("a.weight",)}, tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors")
    save_file({k: tensors[k] for k in ("b.bias", "c.weight")},
              tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors")
    source = weights.WeightSource.of_files(sorted(tmp_path.glob("*.safetensors")), "here")
    assert sorted(source.keys()) == sorted(tensors)
    for key, tensor in tensors.items():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            pieces = list(source.chunks(key, dtype))
            assert b"".join(pieces) == weights.tensor_bytes(tensor.to(dtype)), (key, dtype)
            if dtype == tensor.dtype:
                assert len(pieces) == -(-tensor.numel() * tensor.element_size() // 7)
    save_file({"q.weight": torch.zeros(4, dtype=torch.float8_e4m3fn)}, tmp_path / "quantized.safetensors")
    with pytest.raises(te.errors.ModelNotAvailable, match="q.weight is stored as F8_E4M3, which an export cannot "
                                                          "read .*; pass unquantized weights"):
        weights.WeightSource.of_files([tmp_path / "quantized.safetensors"], "here")


@pytest.mark.parametrize("dies,message", [
    ("os._exit(3)", "the export process ended with exit code 3 before finishing; its log is above"),
    ("os.kill(os.getpid(), 9)", "the export process was killed by signal 9 (out of memory?) before finishing"),
])
def test_an_export_process_that_dies_is_one_clear_error(tmp_path, monkeypatch, dies, message):
    """The child is stood in for by one that dies before answering, as one killed for memory would."""
    from toma_export.errors import ExecutionError
    from toma_export.onnx import child

    monkeypatch.setattr(child, "_CHILD", f"import os; {dies}")
    with pytest.raises(ExecutionError, match=re.escape(message)):
        child.export_in_child("flux-tiny", None, tmp_path, force=True, progress=lambda m: None)
