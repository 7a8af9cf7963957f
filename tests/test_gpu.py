"""Checks that need a CUDA GPU (and, for the plugin, full TensorRT 10.9+). They skip here with the reason;
run them where those exist with `scripts/gpu_checks.sh`, which writes one JSON summary."""
import os
from pathlib import Path

import pytest
import torch

import toma_export as te

cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                          reason="needs a CUDA GPU (run scripts/gpu_checks.sh on a GPU machine)")


def _has_tensorrt():
    """Full TensorRT with bindings, at a version with AOT Python plugins."""
    try:
        import tensorrt

        from toma_export.trt.build import AOT_PLUGINS, trt_version
        return hasattr(tensorrt, "Builder") and trt_version(tensorrt) >= AOT_PLUGINS
    except ImportError:
        return False


tensorrt = pytest.mark.skipif(not _has_tensorrt(), reason="needs full TensorRT 10.9+ with Python bindings "
                                                            "(pip install tensorrt on the GPU machine)")


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
@pytest.mark.parametrize("name", ["flux-tiny", "sdxl-tiny"])
@pytest.mark.parametrize("dtype,limit", [(torch.float16, 0.02), (torch.bfloat16, 0.06)])
def test_patch_on_cuda_in_half_precision_matches_fp32(name, dtype, limit):
    """The PyTorch reference on the GPU: the patched network in fp16/bf16 against fp32, with the fp32 run's
    destinations forced (max error relative to the output scale; on CPU these measure 0.0014-0.0025 in fp16
    and 0.011-0.021 in bf16), and the destinations it selects itself (near-ties flip, the objective stays)."""
    from toma_export.onnx import ToMAGraph
    from toma_export.parity.metrics import selection_agreement
    from toma_export.toma.selection import recompute_flag

    spec = te.models.get(name)
    runs = {}
    for dt in (torch.float32, dtype):
        model = spec.load(dt).cuda()
        graph = ToMAGraph(model, spec, te.apply_toma(model)).eval()
        net = {k: v.cuda() for k, v in spec.graph_inputs(batch=2, dtype=dt, smooth=True).items()}
        toma = {k: v.cuda() for k, v in graph.sample_toma_inputs(net).items()}
        with torch.no_grad():
            selected = graph(*net.values(), *toma.values())
            if dt is torch.float32:
                forced, tiles = selected, {g: t.cpu() for g, t in graph.last_tiles.items()}
            else:
                previous = dict(zip(graph.input_names[len(net):-1], runs[torch.float32][1:]))
                toma.update(previous, toma_recompute=recompute_flag(False, device="cuda"))
                forced = graph(*net.values(), *toma.values())
        runs[dt], runs[(dt, "own")] = forced, selected
    ref, out = runs[torch.float32][0].float(), runs[dtype][0].float()
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() <= limit * ref.abs().max().item()
    for g, own, ref_dst in zip(graph.groups, runs[(dtype, "own")][1:], runs[torch.float32][1:]):
        agreement = selection_agreement(tiles[g], ref_dst.cpu(), own.cpu())
        assert agreement["objective_ratio"] > 0.99, (g, agreement)


@cuda
@tensorrt
@pytest.mark.parametrize("name,selection", [("flux-tiny", "plugin"), ("sdxl-tiny", "plugin"), ("flux-tiny", "body")])
def test_plugin_engine_matches_onnxruntime(tmp_path, name, selection):
    """Build with the toma::ToMASelect plugin (AOT Triton kernel) or with the inlined body, run it, and compare
    with ONNX Runtime on the same inputs and forced destinations."""
    import numpy as np
    import onnxruntime as ort

    from toma_export.onnx import ToMAGraph
    from toma_export.onnx.graph import RECOMPUTE
    from toma_export.toma.selection import recompute_flag
    from toma_export.trt import BuildOptions, build
    from toma_export.trt.build import BODY, PLUGIN
    from toma_export.runtime.tensorrt import EngineRunner

    meta = build(name, te.ToMAConfig(), tmp_path, BuildOptions(backend="tensorrt", selection=selection))
    assert meta["selection"] == {"plugin": PLUGIN, "body": BODY}[selection]
    assert (meta["ptx_version"] is not None) == (selection == "plugin")
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
    forced[RECOMPUTE] = recompute_flag(False)
    out = runner(forced)
    noise = out[meta["outputs"][0]["name"]].float().cpu().numpy()
    assert np.abs(noise - ref[0]).max() <= 1e-3 * np.abs(ref[0]).max()


@cuda
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_bench_gpu_mode(tmp_path, dtype):
    """`toma-export bench --device cuda` at a small grid: half-precision blocks and their parts, and the Triton
    selection identical to the PyTorch greedy."""
    import json

    from toma_export.cli import main

    assert main(["bench", "--device", "cuda", "--gpu-dtype", dtype, "--grid", "16", "--text", "16", "--ratios", "0.5",
                 "--repeats", "2", "--models", "", "--json", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["machine"]["gpu"]
    assert {r["backend"] for r in doc["results"]} >= {f"torch-cuda-{dtype}", "cuda"}
    selection = [r for r in doc["results"] if r["method"] == "triton-kernel"]
    assert selection and all(r["rel_l2_vs_baseline"] == 0.0 for r in selection)
    broken_down = [r for r in doc["results"] if r["backend"] == f"torch-cuda-{dtype}" and r["method"] == "toma"]
    assert broken_down and all(r["breakdown"]["sum_ms"] > 0 for r in broken_down)   # the same parts as on the CPU
    assert {a["schedule"] for a in doc["amortised"]} == {"default", "official FLUX (merge every 3rd step)"}


@cuda
@tensorrt
def test_generate_through_a_tensorrt_engine(tmp_path):
    """The serving path on a GPU: engine build pinned to the size, the drop-in with CUDA graphs, an image."""
    from toma_export.cli import main

    out = tmp_path / "fox.png"
    assert main(["generate", "--model", "flux-tiny", "--backend", "tensorrt", "--prompt", "a red fox", "--steps", "3",
                 "--size", "256x256", "--output-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@cuda
@tensorrt
@pytest.mark.parametrize("mode", ["refit", "identical"])
def test_weightless_engine_matches_the_normal_engine(tmp_path, mode, record_property):
    """`build --weightless` on full TensorRT: the plan leaves the weights out (it is smaller than the normal plan by
    at least half the weights' bytes), every load refits it from the export, and it then gives the normal engine's
    outputs, per call (destinations forced) and through generate. Plain REFIT may drop a GEMM bias (TensorRT
    11.3's docs): this is where that would show. The plan sizes go to the summary's user properties."""
    import numpy as np
    from PIL import Image

    from toma_export.artifacts import Artifact
    from toma_export.cli import main
    from toma_export.onnx import ToMAGraph
    from toma_export.onnx.graph import RECOMPUTE
    from toma_export.runtime.tensorrt import EngineRunner
    from toma_export.toma.selection import recompute_flag
    from toma_export.trt import BuildOptions, build

    normal = build("flux-tiny", te.ToMAConfig(), tmp_path, BuildOptions(backend="tensorrt", selection="body"))
    stripped = build("flux-tiny", te.ToMAConfig(), tmp_path, BuildOptions(backend="tensorrt", selection="body",
                                                                           weightless=mode))
    weights = Artifact.load(normal["onnx"], "onnx").meta["weights"]["bytes"]
    sizes = dict(normal_plan=normal["engine_bytes"], weightless_plan=stripped["engine_bytes"], weights=weights)
    record_property("plan_bytes", sizes)
    assert stripped["weightless"] == mode and stripped["weights"] == normal["onnx"]
    assert stripped["engine_bytes"] <= normal["engine_bytes"] - weights // 2, sizes

    spec = te.models.get("flux-tiny")
    model = spec.load()
    graph = ToMAGraph(model, spec, te.apply_toma(model)).eval()
    net = spec.graph_inputs(batch=2, smooth=True)
    feeds = dict(zip(graph.input_names, [*net.values(), *graph.sample_toma_inputs(net).values()]))
    runners = [EngineRunner(Path(m["engine"]).with_name("engine.json")) for m in (normal, stripped)]
    first = runners[0](feeds)
    forced = dict(feeds, **{n: first[o["name"]].cpu() for n, o in zip(graph.input_names[len(net):-1],
                                                                        normal["outputs"][1:])})
    forced[RECOMPUTE] = recompute_flag(False)
    noise = [r(forced)[normal["outputs"][0]["name"]].float().cpu().numpy() for r in runners]
    assert np.abs(noise[1] - noise[0]).max() <= 1e-3 * np.abs(noise[0]).max()

    images = []
    for meta in (normal, stripped):
        out = tmp_path / f"{meta['weightless'] if meta.get('weightless') else 'normal'}.png"
        assert main(["generate", "--model", "flux-tiny", "--backend", "tensorrt", "--engine",
                     str(Path(meta["engine"]).with_name("engine.json")), "--prompt", "a red fox", "--steps", "3",
                     "--size", "256x256", "--seed", "5", "--out", str(out)]) == 0
        images.append(np.asarray(Image.open(out), dtype=np.int16))
    assert np.abs(images[1] - images[0]).mean() <= 1.0


@cuda
@tensorrt
def test_first_block_cache_engines_skip_where_onnxruntime_does(tmp_path, record_property):
    """build --cache's head and tail engines served with First-Block Cache (CUDA graphs): the same decisions as the
    ONNX Runtime pair on the same prompt, seed and threshold (one may differ where rounding crosses it), and an image
    close to it."""
    import numpy as np

    from toma_export.cache import CacheConfig
    from toma_export.serve.generate import Session
    from toma_export.serve.pipeline import serving_artifacts

    cache, runs = CacheConfig(0.1), {}
    for backend in ("tensorrt", "onnxruntime"):
        toma, _ = serving_artifacts("flux-tiny", te.ToMAConfig(), (128, 128), 1, backend, tmp_path, cache=cache)
        session = Session(toma, model="flux-tiny", cache=cache)
        image = session.run(["a red circle on a white background"], [0], 128, 128, 28, 3.5)[0]
        runs[backend] = [d[2] for d in session.network.cache.decisions], np.asarray(image, dtype=float)
    (trt_steps, trt_image), (ort_steps, ort_image) = runs["tensorrt"], runs["onnxruntime"]
    differ = [i for i, (a, b) in enumerate(zip(trt_steps, ort_steps)) if a != b]
    record_property("fbcache_engines", dict(tensorrt=sum(trt_steps), onnxruntime=sum(ort_steps), differ=differ))
    assert len(trt_steps) == 28 and 0 < sum(trt_steps) < 28 and len(differ) <= 1
    if not differ:
        assert np.abs(trt_image - ort_image).mean() < 2.0


@cuda
@tensorrt
@pytest.mark.parametrize("toma", [False, True], ids=["no-toma", "toma"])
def test_quantized_engines_against_the_fp16_engine(tmp_path, toma, record_property):
    """Each 8-bit engine (INT8; FP8 from Ada, sm89, on) of sdxl-tiny against its fp16 engine, with and without
    ToMA: time per step through the served loop and how close the image stays (mean pixel difference and the
    shapes judge's fidelity). The figures go to the summary's user properties (docs/quantize.md)."""
    import statistics

    import numpy as np

    pytest.importorskip("modelopt.torch.quantization", reason="needs nvidia-modelopt (carry its wheel in .whl/)")
    from toma_export.calibration import CalibrationOptions, calibrate
    from toma_export.quality import judge
    from toma_export.serve.generate import Session
    from toma_export.trt import BuildOptions, build

    config = te.ToMAConfig() if toma else None
    modes = ["int8"] + (["fp8"] if torch.cuda.get_device_capability() >= (8, 9) else [])
    prompt, figures, images = "a red circle on a white background", {}, {}
    for mode in ["none", *modes]:
        quant = None if mode == "none" else calibrate("sdxl-tiny", config, CalibrationOptions(mode=mode, steps=4),
                                                      tmp_path / "calib", quiet=True)
        meta = build("sdxl-tiny", config, tmp_path, BuildOptions(backend="tensorrt", dtype="fp16", quant=quant,
                                                                 min_size=(128, 128), opt_size=(128, 128),
                                                                 max_size=(128, 128)))
        engine = str(Path(meta["engine"]).with_name("engine.json"))
        session = Session(engine if toma else None, None if toma else engine, model="sdxl-tiny")
        session.run([prompt], [0], 128, 128, 4, 5.0)                                   # warm-up
        image = session.run([prompt], [0], 128, 128, 28, 5.0)[0]
        images[mode] = image
        figures[mode] = dict(step_ms=round(1000 * statistics.median(t for _, t in session.network.timings), 3),
                             engine_bytes=meta["engine_bytes"])
    model = judge.load()
    reference = judge.features(model, [images["none"]])
    for mode in modes:
        diff = np.abs(np.asarray(images[mode], dtype=float) - np.asarray(images["none"], dtype=float)).mean()
        figures[mode].update(mean_pixel_difference=round(float(diff), 2),
                             judge_fidelity=round(judge.fidelity(judge.features(model, [images[mode]]), reference), 4),
                             speedup=round(figures["none"]["step_ms"] / figures[mode]["step_ms"], 3))
    record_property("quantized_engines", dict(toma=toma, **figures))
    for mode in modes:
        assert figures[mode]["judge_fidelity"] > 0.9 and figures[mode]["mean_pixel_difference"] < 40, figures


@cuda
@tensorrt
@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_controlnet_engines_match_onnxruntime(tmp_path, family, record_property):
    """build --controlnet with full TensorRT (the ToMASelect plugin in both graphs): the ControlNet's engine and the
    network's taking its residuals, each against ONNX Runtime on its own export, same inputs, destinations forced;
    each output's error over its scale goes to the summary."""
    import numpy as np
    import onnxruntime as ort

    from toma_export.onnx import ToMAGraph
    from toma_export.onnx.graph import RECOMPUTE
    from toma_export.runtime.tensorrt import EngineRunner
    from toma_export.toma.selection import recompute_flag
    from toma_export.trt import BuildOptions
    from toma_export.trt.build import build_controlled

    net, cn = {"sdxl": ("sdxl-tiny", "sdxl-tiny-controlnet"), "flux": ("flux-tiny", "flux-tiny-controlnet")}[family]
    made = build_controlled(net, [cn], te.ToMAConfig(), tmp_path, BuildOptions(backend="tensorrt"))
    layout = te.models.get(cn).residual_layout()
    errors = {}
    for spec, meta in ((te.models.get(cn), made["controlnets"][0]),
                       (te.models.get(net).with_control(layout), made["network"])):
        model = spec.load()
        graph = ToMAGraph(model, spec, te.apply_toma(model)).eval()
        x = spec.graph_inputs(batch=2, smooth=True)
        feeds = dict(zip(graph.input_names, [*x.values(), *graph.sample_toma_inputs(x).values()]))
        session = ort.InferenceSession(meta["onnx"])
        own = len(graph.output_names) - len(graph.groups)
        picked = session.run(None, {k: np.asarray(v) for k, v in feeds.items()})[own:]
        forced = dict(feeds, **{n: torch.as_tensor(p) for n, p in zip(graph.input_names[len(x):-1], picked)})
        forced[RECOMPUTE] = recompute_flag(False)
        ref = session.run(None, {k: np.asarray(v) for k, v in forced.items()})
        out = EngineRunner(Path(meta["engine"]).with_name("engine.json"))(forced)
        for name, r in zip(graph.output_names[:own], ref):
            got = out[name].float().cpu().numpy()
            errors[f"{spec.name}:{name}"] = float(np.abs(got - r).max() / max(float(np.abs(r).max()), 1e-6))
    record_property("controlnet_engines", errors)
    assert errors and max(errors.values()) <= 2e-3, errors
