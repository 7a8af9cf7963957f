"""Checks that need a CUDA GPU (and, for the plugin, full TensorRT). They skip here with the reason; run
them where those exist with `scripts/gpu_checks.sh`."""
import os
from pathlib import Path

import pytest
import torch

import toma_export as te

cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                          reason="needs a CUDA GPU (run scripts/gpu_checks.sh on a GPU machine)")


def _has_tensorrt():
    try:
        import tensorrt
        return hasattr(tensorrt, "Builder")
    except ImportError:
        return False


tensorrt = pytest.mark.skipif(not _has_tensorrt(), reason="needs full TensorRT with Python bindings (10.7+)")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_kernel_on_cuda_equals_reference(dtype):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4096, 8, 64, generator=g)
    owner = torch.randint(0, 8, (4096, 16), generator=g)
    x = (centres.gather(1, owner.unsqueeze(-1).expand(-1, -1, 64)) + 0.05 * torch.randn(4096, 16, 64)).to(dtype)
    want = te.facility_location(x, 8)
    got = te.facility_location(x.cuda(), 8, impl="triton").cpu()
    assert (got == want).float().mean() > 0.999


@cuda
@tensorrt
@pytest.mark.parametrize("name", ["flux-tiny", "sdxl-tiny"])
def test_plugin_engine_matches_onnxruntime(tmp_path, name):
    """Build with the toma::ToMASelect plugin (AOT Triton kernel), run it, and compare with ONNX Runtime on
    the same inputs and forced destinations."""
    import numpy as np
    import onnxruntime as ort

    from toma_export.onnx import ToMAGraph
    from toma_export.onnx.graph import RECOMPUTE
    from toma_export.trt import BuildOptions, build
    from toma_export.trt.runner import EngineRunner

    meta = build(name, te.ToMAConfig(), tmp_path, BuildOptions(backend="tensorrt"))
    assert meta["selection"].startswith("plugin")
    spec = te.models.get(name)
    model = spec.load()
    graph = ToMAGraph(model, spec, te.apply_toma(model)).eval()
    net = spec.graph_inputs(batch=2, smooth=True)
    toma = graph.sample_toma_inputs(net)
    feeds = dict(zip(graph.input_names, [*net.values(), *toma.values()]))
    session = ort.InferenceSession(meta["onnx"])
    ref = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    runner = EngineRunner(Path(meta["engine"]).with_name("engine.json"))
    out = runner(feeds)
    picks = [out[o["name"]].cpu().numpy() for o in meta["outputs"][1:]]
    agree = np.mean([np.mean(p == r) for p, r in zip(picks, ref[1:])])
    assert agree > 0.97
    forced = dict(feeds, **{n: torch.as_tensor(r) for n, r in zip(graph.input_names[len(net):-1], ref[1:])})
    forced[RECOMPUTE] = torch.tensor(False)
    out = runner(forced)
    noise = out[meta["outputs"][0]["name"]].float().cpu().numpy()
    assert np.abs(noise - ref[0]).max() <= 1e-3 * np.abs(ref[0]).max()


@cuda
def test_bench_gpu_mode(tmp_path):
    """`toma-export bench --device cuda` at a small grid: fp16 blocks, and the Triton selection identical to
    the PyTorch greedy."""
    import json

    from toma_export.cli import main

    assert main(["bench", "--device", "cuda", "--grid", "16", "--text", "16", "--ratios", "0.5", "--repeats", "2",
                 "--models", "", "--json", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["machine"]["gpu"]
    assert {r["backend"] for r in doc["results"]} >= {"torch-cuda-fp16", "cuda"}
    selection = [r for r in doc["results"] if r["method"] == "triton-kernel"]
    assert selection and all(r["rel_l2_vs_baseline"] == 0.0 for r in selection)


@cuda
@tensorrt
def test_generate_through_a_tensorrt_engine(tmp_path):
    """The serving path on a GPU: engine build pinned to the size, the drop-in with CUDA graphs, an image."""
    from toma_export.cli import main

    out = tmp_path / "fox.png"
    assert main(["generate", "--model", "flux-tiny", "--backend", "tensorrt", "--prompt", "a red fox", "--steps", "3",
                 "--size", "256x256", "--output-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
