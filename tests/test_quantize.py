"""8-bit exports (docs/quantize.md). Real layers: nvidia-modelopt calibrating the tiny diffusers pipelines on
the CPU, torch.onnx, ONNX Runtime's CPU kernels (integer MatMul included), TensorRT-RTX's builder and the
shapes judge. Nothing is stood in for; the GPU engines are scripts/gpu_checks.sh's."""
import collections

import numpy as np
import onnx
import pytest
import torch

import toma_export as te
from toma_export import quantize
from toma_export.calibration import CalibrationOptions, calibrate
from toma_export.onnx import ExportOptions, export

pytest.importorskip("modelopt.torch.quantization", reason="needs nvidia-modelopt (installed by make test)")
quiet = dict(progress=lambda m: None)
SIZE = 128
STEPS = 3                  # calibration steps per prompt: enough for the scales, a third of the default's cost


@pytest.fixture(scope="module")
def quantized(artifacts):
    """(calibration, static export meta) per (model, mode): calibrated with ToMA on (the built-in prompts), and
    exported as `generate` serves it (128 px, the CFG batch)."""
    made = {}

    def get(name, mode):
        if (name, mode) not in made:
            spec = te.models.get(name)
            quant = calibrate(name, te.ToMAConfig(), CalibrationOptions(mode=mode, steps=STEPS), artifacts / "calib",
                              quiet=True, **quiet)
            meta = export(name, te.ToMAConfig(), artifacts / "onnx",
                          ExportOptions(height=SIZE, width=SIZE, batch=spec.cfg_batch(spec.default_guidance),
                                        quant=quant), **quiet)
            made[name, mode] = quant, meta
        return made[name, mode]

    return get


def _session_of(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("mode,axis", [("int8", None), ("int8", 0), ("fp8", None)])
def test_fake_quantization_is_onnx_runtimes_arithmetic(tmp_path, mode, axis):
    """Eager qdq and the exported QuantizeLinear/DequantizeLinear pair give the same bits, rounding ties
    and saturation included: what lets parity hold a quantized graph to a tight tolerance."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 257, generator=g) * 3
    x[0, :4] = torch.tensor([0.5, 1.5, -2.5, 1e4])              # ties to even, and saturation
    scale = (torch.rand(64, generator=g) * 0.05 + 0.01) if axis == 0 else torch.tensor(0.02)

    class QDQ(torch.nn.Module):
        def forward(self, v):
            return quantize.qdq(v, scale, mode, axis)

    path = tmp_path / "qdq.onnx"
    program = torch.onnx.export(QDQ(), (x,), dynamo=True, opset_version=quantize.OPSET)
    model = program.model_proto
    from toma_export.onnx.export import _zero_points

    _zero_points(model)
    onnx.save(model, path)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == 1
    (got,) = _session_of(str(path)).run(None, {model.graph.input[0].name: x.numpy()})
    np.testing.assert_array_equal(got, quantize.qdq(x, scale, mode, axis).numpy())
    assert (got != x.numpy()).mean() > 0.5                        # it did quantize


def test_the_fake_quantized_layers_compute_what_modelopt_calibrated():
    """Our layers with the scales read out of modelopt's quantizers give modelopt's own fake-quantized output
    (SmoothQuant int8, max-calibrated fp8): the conversion amax -> scale, smoothing included, is right."""
    import modelopt.torch.quantization as mtq

    from toma_export.calibration import _quiet_modelopt, _recipe, _scales

    for mode in ("int8", "fp8"):
        torch.manual_seed(0)
        net = torch.nn.Sequential(collections.OrderedDict(
            fc1=torch.nn.Linear(32, 64), act=torch.nn.GELU(), fc2=torch.nn.Linear(64, 16)))
        data = [torch.randn(8, 32) * torch.linspace(0.1, 4, 32) for _ in range(4)]   # outlier channels
        ours = torch.nn.Sequential(collections.OrderedDict(
            fc1=torch.nn.Linear(32, 64), act=torch.nn.GELU(), fc2=torch.nn.Linear(64, 16)))
        ours.load_state_dict(net.state_dict())
        chosen = {"fc1": "linear", "fc2": "linear"}
        with _quiet_modelopt():
            mtq.quantize(net, _recipe(chosen, mode), lambda m: [m(x) for x in data])
        scales = _scales(net, chosen, mode)
        names, smoothed = quantize.scale_names(scales)
        assert names == ["fc1", "fc2"] and smoothed == (names if mode == "int8" else [])
        quantize.install(ours, mode, names, smoothed)
        for key, value in scales.items():
            ours.get_buffer(key).copy_(value)
        probe = torch.randn(8, 32) * torch.linspace(0.1, 4, 32)
        with _quiet_modelopt():
            want = net(probe)
        got = ours(probe)
        with quantize.disabled(ours):
            plain = ours(probe)
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-5, (mode, err)
        assert ((plain - want).norm() / want.norm()).item() > 1e-3        # quantization changed it


@pytest.mark.parametrize("name,mode", [("flux-tiny", "int8"), ("sdxl-tiny", "int8"), ("flux-tiny", "fp8")])
def test_quantized_export_is_standard_qdq_around_an_unchanged_selection(quantized, name, mode):
    quant, meta = quantized(name, mode)
    q = meta["quantize"]
    assert (q["mode"], q["level"], q["digest"]) == (mode, "3.0", quant.digest) and q["quantized_layers"] > 10
    assert meta["onnx"].split("/")[-2].startswith(f"{name}-{mode}-")
    model = onnx.load(meta["onnx"], load_external_data=False)
    nodes = model.graph.node
    ops = collections.Counter(n.op_type for n in nodes)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 2 * q["quantized_layers"]
    assert model.opset_import[0].version >= quantize.OPSET
    made_by = {o: n for n in nodes for o in n.output}
    constants = {n.output[0]: n for n in nodes if n.op_type == "Constant"}
    want = onnx.TensorProto.INT8 if mode == "int8" else onnx.TensorProto.FLOAT8E4M3FN
    for n in nodes:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert len(n.input) == 3 and n.input[2] in constants           # constant zero points
            assert constants[n.input[2]].attribute[0].t.data_type == want
        if n.domain == "toma":                                              # the selection, fed by no DQ
            assert all(made_by.get(i) is None or made_by[i].op_type != "DequantizeLinear" for i in n.input)
    assert sum(n.domain == "toma" for n in nodes) == meta["toma"]["selection_nodes"] > 0
    # the scales are data, stored like the weights under their state_dict-style keys
    external = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    scales, _ = quantize.load_scales(quant.scales)
    assert set(scales) <= external and any(k.endswith(".input_smooth") for k in scales) == (mode == "int8")
    assert any(k.endswith(".weight") for k in external)


def test_onnx_runtime_runs_int8_layers_on_integer_kernels(quantized, tmp_path):
    """The constant zero points, the weight's DequantizeLinear feeding the MatMul directly and the runtime's
    session options let ONNX Runtime's CPU optimiser turn each quantized Linear into its integer kernel, which
    is what makes INT8 faster on a CPU at all."""
    import onnxruntime as ort

    from toma_export.runtime.onnxruntime import load_session

    _, meta = quantized("flux-tiny", "int8")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    load_session(meta["onnx"], options, ["CPUExecutionProvider"])
    fused = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath,
                                                             load_external_data=False).graph.node)
    linears = sum(k.endswith(".input_scale") for k in quantize.load_scales(meta["quantize"]["scales"])[0])
    assert fused["MatMulIntegerToFloat"] == linears == meta["quantize"]["quantized_layers"], fused


@pytest.mark.parametrize("name,mode", [("flux-tiny", "int8"), ("sdxl-tiny", "int8"), ("flux-tiny", "fp8")])
def test_quantized_graph_matches_the_fake_quantized_reference(quantized, name, mode):
    from toma_export.parity import ValidateOptions, validate

    _, meta = quantized(name, mode)
    report = validate(name, None, ValidateOptions(onnx=meta["onnx"], backends=("onnxruntime",), steps=2), **quiet)
    assert report["passed"], report["comparisons"]
    assert report["reference"] == f"torch fp32, {mode} fake-quantized" and report["quantize"]["mode"] == mode
    for c in report["comparisons"]:
        assert c["max_abs"] <= c["tolerance"] and c["cosine"] > 0.999
    # the graph follows its own reference far more closely than quantizing moves the network
    (cost,) = report["quantization"]
    step = next(c for c in report["comparisons"] if c["kind"] == "step")
    assert 1e-3 < cost["step_relative_l2"] < 0.1 and cost["loop_relative_l2"] < 0.5
    assert step["max_abs"] / step["tolerance"] < 1


def test_an_int8_image_reads_right_to_the_judge(quantized, artifacts):
    """sdxl-tiny, INT8 with ToMA, served from its exported graph on ONNX Runtime: the judge reads each caption
    off the image."""
    from toma_export import shapes
    from toma_export.quality import judge
    from toma_export.serve.generate import Session

    spec = te.models.get("sdxl-tiny")
    _, meta = quantized("sdxl-tiny", "int8")
    session = Session(meta["onnx"], model="sdxl-tiny")
    captions = shapes.grammar()[::3]                   # 8 captions; unquantized with ToMA it reads all 8
    images = [session.run([c], [0], SIZE, SIZE, 28, spec.default_guidance)[0] for c in captions]
    model = judge.load()
    scored = dict(judge.attribute_accuracy(model, images, captions),
                  accuracy=judge.prompt_accuracy(model, images, captions))
    assert scored["accuracy"] >= 0.75 and scored["colour"] == scored["background"] == 1.0, scored   # 7/8 measured
    assert all(np.asarray(image.convert("RGB")).std() > 20 for image in images)      # pictures, not flat fields


def test_tensorrt_rtx_builds_a_quantized_graph_strongly_typed(quantized, artifacts):
    from toma_export.trt import BuildOptions, build

    pytest.importorskip("tensorrt_rtx", reason="needs tensorrt-rtx-cu13 (installed by make test)")
    quant, _ = quantized("flux-tiny", "int8")
    meta = build("flux-tiny", te.ToMAConfig(), artifacts, BuildOptions(backend="tensorrt-rtx", static=True,
                                                                       opt_size=(SIZE, SIZE), quant=quant), **quiet)
    assert meta["quantize"]["mode"] == "int8" and meta["engine_bytes"] > 100_000
    assert open(meta["engine"], "rb").read(4) and meta["selection"] == "inlined ONNX body"
    onnx_meta = te.artifacts.Artifact.load(meta["onnx"], "onnx").meta if hasattr(te, "artifacts") else None
    assert onnx_meta is None or onnx_meta["quantize"]["digest"] == quant.digest


@pytest.mark.parametrize("args,message", [
    (["export", "--model", "flux-tiny", "--quantize", "int4"], "invalid choice: 'int4'"),
    (["export", "--model", "flux-tiny", "--quantize", "int8", "--quant-level", "4.0"],
     "level 4.0 (quantized attention) is not supported"),
    (["export", "--model", "flux-tiny", "--quantize", "int8", "--quant-level", "9"], "--quant-level must be one of"),
    (["export", "--model", "flux-tiny", "--quantize", "int8", "--calib-prompts", "/nonexistent/prompts.txt"],
     "--calib-prompts /nonexistent/prompts.txt: no such file"),
    (["export", "--model", "flux-tiny", "--quantize", "int8", "--cache", "fbcache:0.1"], "--quantize with --cache"),
    (["build", "--model", "flux-tiny", "--quantize", "fp8", "--backend", "tensorrt-rtx", "--target", "sm86"],
     "--quantize fp8 needs a GPU with FP8 tensor cores"),
    (["export", "--model", "flux-tiny", "--quantize", "int8", "--opset", "18"], "needs opset 19 or later"),
    (["generate", "--model", "flux-tiny", "--quantize", "int8", "--onnx", "x.onnx", "--prompt", "a",
      "--out", "x.png"],
     "carry their own quantization"),
])
def test_quantize_refusals_are_one_line(tmp_path, cli_here, args, message):
    res = cli_here(*args, "--output-dir", tmp_path)
    assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "calib").exists() or not any((tmp_path / "calib").iterdir())   # refused before work


def test_an_empty_prompts_file_and_a_lora_are_refused(tmp_path, cli_here):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    res = cli_here("export", "--model", "sdxl-tiny", "--quantize", "fp8", "--calib-prompts", empty, "--output-dir",
                   tmp_path)
    assert res.returncode == 2 and "holds no prompt; write one prompt per line" in res.stderr
    with pytest.raises(te.errors.UsageError, match="--quantize with --lora: .* fuse the LoRA"):
        quantize.refuse("int8", loras=(("style.safetensors", 1.0),))
    quantize.refuse("none", loras=(("style.safetensors", 1.0),))              # unquantized: no objection


def test_calibration_prompts_and_reuse(tmp_path, artifacts):
    from toma_export.calibration import prompts
    from toma_export.shapes import grammar

    tiny = prompts(te.models.get("flux-tiny"), None)
    assert len(tiny) == 8 and set(tiny) <= set(grammar())
    file = tmp_path / "mine.txt"
    file.write_text("a cat\n\n a dog \n")
    assert prompts(te.models.get("flux-tiny"), str(file)) == ["a cat", "a dog"]
    said = []
    first = calibrate("flux-tiny", None, CalibrationOptions(mode="int8", prompts=str(file), steps=1), tmp_path,
                      progress=said.append, quiet=True)
    again = calibrate("flux-tiny", None, CalibrationOptions(mode="int8", prompts=str(file), steps=1), tmp_path,
                      progress=said.append, quiet=True)
    assert first == again and any("reusing" in s for s in said)
    scales, meta = quantize.load_scales(first.scales)
    assert meta["mode"] == "int8" and meta["prompts"] == '["a cat", "a dog"]'
    assert all(torch.isfinite(v).all() and (v > 0).all() for v in scales.values())
    other = calibrate("flux-tiny", None, CalibrationOptions(mode="int8", prompts=str(file), steps=2), tmp_path,
                      progress=said.append, quiet=True)
    assert other.digest != first.digest                                   # the steps key the scales


def test_sweep_runs_each_ratio_in_each_mode(tmp_path):
    """`sweep --quantize none,int8`: every ratio unquantized and INT8 (fake-quantized on the torch backend,
    calibrated with ToMA at the row's ratio), judged against the unquantized ratio 0."""
    from toma_export.quality.sweep import SweepRequest, sweep, write

    req = SweepRequest(model="flux-tiny", ratios=(0.0, 0.5), prompts=("a red circle on a white background",),
                       steps=4, size=(SIZE, SIZE), quantizes=("none", "int8"), calib_steps=1, output_dir=str(tmp_path))
    result = sweep(req, quiet=True, **quiet)
    rows = result["rows"]
    assert [(r["ratio"], r["quantize"]) for r in rows] == [(0.0, "none"), (0.5, "none"), (0.0, "int8"),
                                                            (0.5, "int8")]
    assert rows[0]["fidelity"] == pytest.approx(1.0) and all(0 < r["fidelity"] < 1 for r in rows[1:])
    assert len(list((tmp_path / "calib").iterdir())) == 2                       # one per ToMA setting
    files = write(result, tmp_path / "out")
    assert set(files) >= {"grid", "pareto", "json"}
    from toma_export.quality.report import row_label

    assert row_label(rows[3]) == "ratio 0.5 + int8"


def test_export_repo_checks_the_files_mode(quantized, tmp_path, cli_here):
    _, meta = quantized("flux-tiny", "int8")
    res = cli_here("export-repo", "--onnx", meta["onnx"], "--out", tmp_path / "repo", "--quantize", "fp8")
    assert res.returncode == 2 and "is int8, not fp8: export it with --quantize fp8" in res.stderr
    assert not (tmp_path / "repo").exists()
    res = cli_here("export-repo", "--onnx", meta["onnx"], "--out", tmp_path / "repo", "--quantize", "int8", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "repo" / "flux-tiny" / "config.pbtxt").is_file()


def test_generate_quantize_reuses_the_calibration_and_export(quantized, artifacts, tmp_path, cli_here):
    """`generate --quantize int8` with the fixture's calibration settings finds its scales and its export
    (nothing calibrated or traced again) and says what it served."""
    import json

    _, meta = quantized("flux-tiny", "int8")
    res = cli_here("generate", "--model", "flux-tiny", "--quantize", "int8", "--calib-steps", STEPS, "--prompt",
                   "a red circle on a white background", "--size", f"{SIZE}x{SIZE}", "--out", tmp_path / "q.png",
                   "--output-dir", artifacts, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[calibrate] reusing" in res.stderr and "[export] reusing" in res.stderr
    result = json.loads(res.stdout)
    assert result["onnx_or_engine"] == meta["onnx"] and result["quantize"]["mode"] == "int8"
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
