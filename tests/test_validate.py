"""toma-export validate: both tiny models pass torch vs ONNX Runtime at two sizes, per step and over a
4-step loop; a corrupted file fails; NaN is reported as NaN; TensorRT without a GPU is a clear skip."""
import importlib
import json
import shutil
import weakref
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import toma_export as te
from toma_export.onnx import ToMAGraph
from toma_export.parity.metrics import compare
from toma_export.parity.compare import compare_step
from toma_export.parity.record import sample_feeds
from toma_export.parity.validate import ValidateOptions, validate
from toma_export.parity.runners import TorchRunner, onnxruntime_runner
from toma_export.trt.backend import BackendMissing, load


def cli(*args):
    return subprocess.run([sys.executable, "-m", "toma_export.cli", "validate", *args], capture_output=True,
                          text=True, timeout=900)


@pytest.mark.parametrize("name", ["flux-tiny", "sdxl-tiny"])
def test_validate_passes_for_both_tiny_models(artifacts, dynamic_export, name, cli_here):
    dynamic_export(name)                                   # the cached export validate reuses
    res = cli_here("validate", "--model", name, "--backends", "torch,onnxruntime", "--steps", "4", "--sizes",
                   "256x256,192x320", "--output-dir", str(artifacts), "--json")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["passed"] and report["providers"]["onnxruntime"] == "CPUExecutionProvider"
    assert report["peak_rss_gb"] > 0.1                                  # the CLI's addition to the report
    kinds = [(c["kind"], c["size"]) for c in report["comparisons"]]
    assert kinds.count(("step", "256x256")) == 1 and kinds.count(("loop", "192x320")) == 4
    for c in report["comparisons"]:
        assert c["nan"] == 0 and c["max_abs"] <= c["tolerance"] and c["cosine"] > 0.999
        assert {"median_abs", "p99_abs", "atol", "rtol"} <= set(c)
    assert all(s["objective_ratio"] >= 0.999 for s in report["selection"]) and len(report["selection"]) == 2
    # what ToMA changes in the final latents: the trained flux-tiny moves by 0.15-0.25 (merging is not free)
    assert all(0 < f["relative_l2"] < 0.5 for f in report["fidelity"])


def test_corrupted_onnx_fails_and_bisect_names_the_block(artifacts, dynamic_export, tmp_path, cli_here):
    meta = dynamic_export("flux-tiny")
    folder = tmp_path / "corrupt"
    shutil.copytree(meta["onnx"].rsplit("/", 1)[0], folder)
    model = onnx.load(folder / "model.onnx")
    weight = next(t for t in model.graph.initializer if t.name == "single_transformer_blocks.3.proj_out.bias")
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) + 1.0, weight.name))
    onnx.save(model, folder / "model.onnx")                            # one weight perturbed
    res = cli_here("validate", "--model", "flux-tiny", "--onnx", str(folder / "model.onnx"), "--bisect",
                   "--output-dir", str(artifacts), "--json")
    assert res.returncode == 1, res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert not report["passed"] and not report["comparisons"][0]["passed"]
    (bisect,) = report["bisect"]
    assert bisect["first_failing_block"] == "single_transformer_blocks.3"
    assert all(b["found"] for b in bisect["blocks"]) and len(bisect["blocks"]) == 12
    table = cli_here("validate", "--model", "flux-tiny", "--onnx", str(folder / "model.onnx"), "--output-dir",
                     str(artifacts))
    assert table.returncode == 1 and "FAIL" in table.stdout and table.stdout.strip().endswith("FAILED")


def test_reference_saved_here_loads_elsewhere_and_report_is_written(artifacts, dynamic_export, tmp_path, cli_here):
    dynamic_export("sdxl-tiny")
    ref = tmp_path / "reference.npz"
    first = cli("--model", "sdxl-tiny", "--steps", "2", "--output-dir", str(artifacts), "--save-reference", str(ref),
                "--json")
    assert first.returncode == 0 and ref.is_file(), first.stderr[-2000:]
    second = cli("--model", "sdxl-tiny", "--backends", "onnxruntime", "--load-reference", str(ref),
                 "--output-dir", str(artifacts), "--report", str(tmp_path / "report"), "--json")
    assert second.returncode == 0, second.stderr[-2000:]
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert b["reference"].startswith("loaded from") and not b["fidelity"]
    assert [c["max_abs"] for c in a["comparisons"]] == [c["max_abs"] for c in b["comparisons"]]
    assert (tmp_path / "report" / "errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report" / "report.json").read_text())["passed"]
    wrong = cli_here("validate", "--model", "flux-tiny", "--backends", "onnxruntime", "--load-reference", ref)
    assert wrong.returncode == 2 and "holds a reference for sdxl-tiny, not flux-tiny" in wrong.stderr


def test_nan_in_an_input_is_reported_as_such(dynamic_export):
    meta = dynamic_export("flux-tiny")
    spec = te.models.get("flux-tiny")
    model = spec.load()
    graph = ToMAGraph(model, spec, te.apply_toma(model)).eval()
    feeds = sample_feeds(spec, graph, 1, (256, 256))
    feeds["encoder_hidden_states"][0, 0, 0] = np.nan
    runner, _ = onnxruntime_runner(meta["onnx"])
    with TorchRunner(graph) as ref, runner:
        record = dict(feeds=feeds, step=dict(ref.infer(feeds, check_inputs=False)))
        (entry,) = compare_step(record, {"onnxruntime": runner}, ValidateOptions(), (256, 256))
    assert not entry["passed"] and entry["nan"] > 0 and entry["reference_nonfinite"] > 0


def test_metrics_count_nan_and_inf():
    stats = compare(np.ones(4), np.array([1.0, np.nan, np.inf, 1.0]), 0.0, 1e-3)
    assert stats["nan"] == 1 and stats["inf"] == 1 and not stats["passed"]
    assert compare(np.ones(4), np.ones(4) + 1e-6, 0.0, 1e-3)["passed"]


def test_tensorrt_without_gpu_is_a_clear_skip_and_bad_backends_an_error(artifacts, dynamic_export, cli_here):
    """Which case applies is decided from this machine, not from the report: without a CUDA GPU (or with no
    TensorRT to load) tensorrt must be skipped with that reason and compared nowhere; with both it must have
    run, with a passing comparison wherever ONNX Runtime has one. Either way the run passes on the others."""
    dynamic_export("flux-tiny")
    res = cli_here("validate", "--model", "flux-tiny", "--backends", "torch,onnxruntime,tensorrt", "--output-dir",
                   str(artifacts), "--json")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(res.stdout)
    trt = [c for c in report["comparisons"] if "tensorrt" in c["backends"]]
    ort = [c for c in report["comparisons"] if "onnxruntime" in c["backends"]]
    assert ort and all(c["passed"] for c in ort) and report["passed"]
    expected_skip = None if torch.cuda.is_available() else "needs a CUDA GPU (TensorRT engines run only on one)"
    if expected_skip is None:
        try:
            load(None)
        except BackendMissing as err:
            expected_skip = str(err)
    if expected_skip:                                       # here: no GPU (or no TensorRT to load)
        assert report["skipped"] == {"tensorrt": expected_skip} and trt == []
        assert f"[validate] tensorrt skipped: {expected_skip}" in res.stderr
    else:                                                   # a GPU machine with TensorRT: it ran and matched
        assert "tensorrt" not in report["skipped"]
        assert trt and all(c["passed"] and c["nan"] == 0 and c["inf"] == 0 for c in trt)
        assert {(c["kind"], c["size"], c["step"]) for c in trt} == {(c["kind"], c["size"], c["step"]) for c in ort}
    bad = cli_here("validate", "--model", "flux-tiny", "--backends", "onnx")
    assert bad.returncode == 2 and "backends name the candidates, from torch, onnxruntime, tensorrt" in bad.stderr


def test_reference_and_candidates_take_turns_in_memory(artifacts, monkeypatch):
    """A full-size fp32 reference and an fp16 candidate need not fit in memory together. Every model load and
    runtime session validate makes is recorded with what was still alive then (weak references to what the
    earlier ones returned): the reference must be gone before the candidate exists, and the candidate released at
    the end. At fp32 the candidate is the run's shared dynamic export: an fp16 candidate would need an fp16 export
    of its own (54 s), and the turns do not depend on the dtype (test_artifacts covers validate --dtype fp16)."""
    module = importlib.import_module("toma_export.parity.validate")   # the package's `validate` is the function
    loads, alive = [], []

    def record(label, obj):
        loads.append((label, [name for name, ref in alive if ref() is not None]))
        alive.append((label, weakref.ref(obj)))
        return obj

    real_graph, real_session = module._graph, module.onnxruntime_runner
    monkeypatch.setattr(module, "_graph", lambda spec, config, dtype, loras=(), quant=None: record(
        f"torch-{'fp32' if dtype == torch.float32 else 'fp16'}", real_graph(spec, config, dtype, loras)))
    monkeypatch.setattr(module, "onnxruntime_runner",
                        lambda path: (record("onnxruntime", real_session(path)[0]), "CPUExecutionProvider"))
    report = validate("flux-tiny", te.ToMAConfig(), ValidateOptions(
        backends=("torch", "onnxruntime"), dtype="fp32", sizes=((256, 256), (128, 128)), steps=2,
        output_dir=str(artifacts)), progress=lambda m: None)
    assert loads == [("torch-fp32", []), ("onnxruntime", [])]
    assert [name for name, ref in alive if ref() is not None] == []             # the last one released too
    assert report["passed"] and len(report["fidelity"]) == 2                   # fidelity from the reference phase
    # the report keeps its order: by size, the steps of every candidate, then their loops
    assert [(c["kind"], c["size"], c["backends"][1]) for c in report["comparisons"]] == [
        (kind, size, backend) for size in ("256x256", "128x128")
        for kind, n in (("step", 1), ("loop", 2)) for backend in ("onnxruntime",) for _ in range(n)]
