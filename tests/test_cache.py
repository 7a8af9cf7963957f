"""First-Block Cache with ToMA: the option and its refusals, the head/tail split against the whole network, and the
served ONNX Runtime loop's skip decisions against diffusers' own hook on the PyTorch network.

Real layers: diffusers' FluxTransformer2DModel (trained flux-tiny) and its FirstBlockCache hook, torch.onnx exports,
ONNX Runtime sessions, the diffusers FluxPipeline around the served network."""
import json

import pytest
import torch

import toma_export as te
from toma_export import cache
from toma_export.errors import UsageError
from toma_export.onnx import ExportOptions, ToMAGraph
from toma_export.onnx.export import export_split
from toma_export.serve.generate import Session
from toma_export.serve.pipeline import load_pipeline

PROMPT, SEED, STEPS, SIZE = "a red circle on a white background", 0, 28, 128
THRESHOLD = 0.1          # skips about half of flux-tiny's 28 steps, so both decisions occur
SHORT, SHORT_THRESHOLD = 12, 0.2     # the same for 12 steps, whose changes per step are larger


def test_the_option_parses_and_refuses_in_one_line():
    assert cache.parse("none") is None and cache.parse(None) is None
    assert cache.parse("fbcache:0.1") == cache.CacheConfig(0.1) and str(cache.parse("FBCache:0.25")) == "fbcache:0.25"
    for text, words in (("fbcache:0", "(0, 1)"), ("fbcache:1.5", "(0, 1)"), ("fbcache:x", "number"),
                        ("teacache:0.1", "none or fbcache"), ("fbcache", "none or fbcache")):
        with pytest.raises(UsageError, match=words.replace("(", r"\(").replace(")", r"\)")):
            cache.parse(text)


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "sdxl-tiny", "--prompt", "a", "--out", "x.png", "--cache", "fbcache:0.1"],
     "SDXL UNet is not one"),
    (["export", "--model", "sdxl-tiny", "--cache", "fbcache:0.1"], "SDXL UNet is not one"),
    (["export", "--model", "flux-tiny", "--cache", "fbcache:0.1", "--blocks", "transformer_blocks.*"],
     "runs on every step as its head"),
    (["generate", "--model", "flux-tiny", "--prompt", "a", "--out", "x.png", "--cache", "fbcache:2"], "(0, 1)"),
    (["sweep", "--model", "sdxl-tiny", "--ratios", "0", "--cache", "none,fbcache:0.1", "--out", "x"],
     "SDXL UNet is not one"),
    (["generate", "--model", "flux-tiny", "--prompt", "a", "--out", "x.png", "--cache", "fbcache:0.1",
      "--merge-steps", "2"], "every step"),
])
def test_refusals(cli_here, tmp_path, args, message):
    done = cli_here(*args, *(["--output-dir", tmp_path] if args[0] != "sweep" else []))
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()[-1]) > 20


def test_the_head_and_tail_compute_the_whole_network(tiny):
    """Eager: head then tail equals the whole graph, with ToMA in the tail on the same destinations; the head's
    cached-step prediction from the true tail residual is the whole network's output too."""
    spec = te.models.get("flux-tiny")
    model = tiny("flux-tiny")
    try:
        report = te.apply_toma(model, te.ToMAConfig())
        assert spec.head_block not in report.blocks
        whole = ToMAGraph(model, spec, report)
        head, tail = ToMAGraph(model, spec, None, "head"), ToMAGraph(model, spec, report, "tail")
        net = spec.graph_inputs(batch=2, smooth=True)
        expected = whole(*net.values(), *whole.sample_toma_inputs(net).values())
        head_in = head.net_inputs(net)
        first = dict(zip(head.output_names, head(*head_in.values())))
        tail_in = {n: first[n] if n in first else net[n] for n in tail.net_names}
        out = dict(zip(tail.output_names, tail(*tail_in.values(), *tail.sample_toma_inputs(tail_in).values())))
        torch.testing.assert_close(out["noise_pred"], expected[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(out["toma_dst_out.transformer_blocks"], expected[1])
        head_in["fbcache_tail_residual"] = out["fbcache_tail_residual"]
        again = dict(zip(head.output_names, head(*head_in.values())))
        torch.testing.assert_close(again["noise_pred_cached"], expected[0], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(first["noise_pred_cached"], expected[0], atol=1e-2)   # zero residual: not it
    finally:
        te.remove_toma(model)


def _torch_decisions(config):
    """diffusers' FirstBlockCache on the PyTorch pipeline (ToMA patched first): its decision per step, its image."""
    pipe = load_pipeline("flux-tiny")
    pipe.set_progress_bar_config(disable=True)
    if config is not None:
        te.apply_toma(pipe.transformer, config)
    hook = cache.TorchCache(pipe.transformer, cache.CacheConfig(THRESHOLD))
    kwargs = te.models.get("flux-tiny").pipeline_kwargs()
    image = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                 generator=torch.Generator().manual_seed(SEED), **kwargs).images[0]
    return list(hook.decisions), image


@pytest.mark.parametrize("toma", [True, False], ids=["toma", "no-toma"])
def test_the_served_split_skips_where_diffusers_hook_does(artifacts, toma):
    """The exported head and tail on ONNX Runtime decide each step as diffusers' hook does on the PyTorch network:
    same prompt, seed and threshold; within one step where rounding crosses the threshold."""
    import numpy as np

    config = te.ToMAConfig() if toma else None
    meta = export_split("flux-tiny", config, artifacts / "onnx", ExportOptions(height=SIZE, width=SIZE),
                        progress=lambda m: None)
    assert meta["part"] == "tail" and (artifacts / "onnx" / meta["head"] / "model.onnx").is_file()
    reference, reference_image = _torch_decisions(config)
    session = Session(meta["onnx"] if toma else None, None if toma else meta["onnx"], model="flux-tiny",
                      cache=cache.CacheConfig(THRESHOLD))
    with pytest.raises(UsageError, match=r"-head-.*input hidden_states .*static export takes exactly"):
        session.check(256, 256, STEPS, 3.5)             # refused before the text encoders run, naming the head
    image = session.run([PROMPT], [SEED], SIZE, SIZE, STEPS, 3.5)[0]
    served = [d[2] for d in session.network.cache.decisions]
    print(json.dumps(dict(diffusers=reference, served=served)))
    assert len(served) == len(reference) == STEPS
    assert 0 < sum(reference) < STEPS, "the threshold should both skip and compute"
    differ = [i for i, (a, b) in enumerate(zip(served, reference)) if a != b]
    assert len(differ) <= 1, f"decisions differ at steps {differ}"
    assert session.network.calls["cached"] == STEPS - sum(served)
    if not differ:
        assert np.abs(np.asarray(image, float) - np.asarray(reference_image, float)).mean() < 2.0


def test_generate_reports_computed_and_cached_steps(cli_here, artifacts, tmp_path):
    """The served loop through the CLI: the split export (reused from the test above when it ran first) on ONNX
    Runtime, the pipeline's own image, and the step counts in --json."""
    done = cli_here("generate", "--model", "flux-tiny", "--prompt", PROMPT, "--steps", SHORT, "--cache",
                    f"fbcache:{SHORT_THRESHOLD}", "--size", f"{SIZE}x{SIZE}", "--out", tmp_path / "x.png",
                    "--output-dir", artifacts, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["cache"] == f"fbcache:{SHORT_THRESHOLD}" and result["backend"] == "onnxruntime"
    assert result["computed_steps"] + result["cached_steps"] == SHORT and 1 <= result["computed_steps"] < SHORT
    assert "-tail-" in result["onnx_or_engine"] and (tmp_path / "x.png").stat().st_size > 0


def test_sweep_rows_cross_ratios_and_caches(tmp_path):
    """sweep --cache: every ratio with every cache, ratio 0 without one the reference; a cached row computes fewer
    steps, and its cached steps cost less than its computed ones."""
    from toma_export.quality.sweep import SweepRequest, sweep, write

    steps, label = SHORT, f"fbcache:{SHORT_THRESHOLD}"
    result = sweep(SweepRequest(model="flux-tiny", ratios=(0.5,), prompts=(PROMPT,), steps=steps, size=(SIZE, SIZE),
                                caches=(cache.CacheConfig(SHORT_THRESHOLD),)), quiet=True)
    rows = result["rows"]
    assert [(r["ratio"], r["cache"]) for r in rows] == [(0.0, "none"), (0.0, label), (0.5, "none"), (0.5, label)]
    assert rows[0]["fidelity"] > 0.9999 and rows[0]["network_speedup"] == 1
    for r in rows:
        if r["cache"] == "none":
            assert r["computed_steps"] == steps and r["cached_ms"] is None
        else:
            assert 1 <= r["computed_steps"] < steps and r["cached_ms"] < r["step_ms"]
            assert r["network_ms"] < next(x["network_ms"] for x in rows if x["ratio"] == r["ratio"]
                                          and x["cache"] == "none")
    files = write(result, tmp_path)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["caches"] == ["none", label] and len(saved["rows"]) == 4
    from PIL import Image

    assert Image.open(files["grid"]).size[0] > 4 * 96


def test_validate_cache_checks_every_step_against_diffusers_hook(cli_here, artifacts):
    """validate --cache: each step's decision side by side and, where they agree, the output within the fp32 step
    tolerance; the split export is the one the tests above made."""
    done = cli_here("validate", "--model", "flux-tiny", "--cache", f"fbcache:{SHORT_THRESHOLD}", "--steps", SHORT,
                    "--sizes", f"{SIZE}x{SIZE}", "--output-dir", artifacts, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] and len(report["rows"]) == SHORT and report["toma"]
    assert report["computed"]["diffusers"] == report["computed"]["served"] < SHORT
    assert {r["served"] for r in report["rows"]} == {"compute", "cache"}
    assert all(r["passed"] and r["max_abs"] <= r["tolerance"] for r in report["rows"] if "passed" in r)
    refused = cli_here("validate", "--model", "flux-tiny", "--cache", "fbcache:0.1", "--onnx", "x.onnx")
    assert refused.returncode == 2 and "drop --onnx" in refused.stderr


def test_build_makes_the_pair_of_engines_under_one_key(artifacts, cli_here, tmp_path):
    """build --cache --static: TensorRT-RTX (the real builder; its engines run on a GPU only) builds the head and
    tail engines from the static exports the tests above made; the tail's engine.json names the head beside it,
    and a second build reuses both."""
    from pathlib import Path

    from toma_export.artifacts import Artifact
    from toma_export.errors import MissingComponent
    from toma_export.serve.network import head_of, load_network
    from toma_export.trt import BuildOptions, build_split

    options = BuildOptions(backend="tensorrt-rtx", static=True, opt_size=(SIZE, SIZE))     # the exports' size
    meta = build_split("flux-tiny", te.ToMAConfig(), artifacts, options, progress=lambda m: None)
    tail = Artifact.load(Path(meta["engine"]).with_name("engine.json"))
    head = head_of(tail, cache.CacheConfig(0.1))
    assert (tail.meta["part"], head.meta["part"], tail.meta["dynamic"], head.meta["dynamic"]) == \
        ("tail", "head", False, False)
    assert head.meta["toma"] is None and tail.meta["selection"] == "inlined ONNX body"
    assert {i["name"] for i in head.meta["inputs"]} >= {"hidden_states", "fbcache_tail_residual"}
    assert [o["name"] for o in head.meta["outputs"]] == ["noise_pred_cached", "fbcache_hidden", "fbcache_text",
                                                        "fbcache_temb", "fbcache_head_residual"]
    assert {i["name"] for i in tail.meta["inputs"]} >= {"fbcache_hidden", "fbcache_temb", "toma_recompute"}
    assert [o["name"] for o in tail.meta["outputs"]][:2] == ["noise_pred", "fbcache_tail_residual"]
    for engine in (head, tail):
        assert Path(engine.meta["engine"]).stat().st_size == engine.meta["engine_bytes"] > 100_000
    again = build_split("flux-tiny", te.ToMAConfig(), artifacts, options, progress=lambda m: None)
    assert again["engine"] == meta["engine"] and again["build_seconds"] == meta["build_seconds"]
    if not torch.cuda.is_available():
        with pytest.raises(MissingComponent, match="CUDA GPU"):
            load_network(tail, cache=cache.CacheConfig(0.1))
    # the Triton repository of the pair: a plan model per engine, the pipeline with both and its cache parameter
    done = cli_here("export-repo", "--engine", tail.path, "--out", tmp_path / "repo", "--cache", "fbcache:0.2",
                    "--allow-tensorrt-rtx", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    repo = tmp_path / "repo"
    assert (result["plan_model"], result["head_plan_model"]) == ("flux-tiny", "flux-tiny-head")
    assert (repo / "flux-tiny" / "1" / "model.plan").stat().st_size == tail.meta["engine_bytes"]
    assert (repo / "flux-tiny-head" / "1" / "model.plan").stat().st_size == head.meta["engine_bytes"]
    version = repo / result["pipeline_model"] / "1"
    assert (version / "network" / "engine.json").is_file() and (version / tail.meta["head"] / "engine.plan").is_file()
    assert 'key: "cache"\n  value: { string_value: "fbcache:0.2" }' in (version.parent / "config.pbtxt").read_text()


def test_sweep_on_onnxruntime_serves_every_row(artifacts):
    """sweep --backend onnxruntime: each row through the served pipeline (Session), the split exports for cached
    rows (those the tests above made, and test_serve's static exports for the others, reused by key)."""
    from toma_export.quality.sweep import SweepRequest, sweep

    result = sweep(SweepRequest(model="flux-tiny", ratios=(0.5,), backend="onnxruntime", prompts=(PROMPT,),
                                steps=SHORT, size=(SIZE, SIZE), caches=(cache.CacheConfig(SHORT_THRESHOLD),),
                                output_dir=str(artifacts)),
                   quiet=True)
    rows = result["rows"]
    assert [(r["ratio"], r["cache"]) for r in rows] == [(0.0, "none"), (0.0, f"fbcache:{SHORT_THRESHOLD}"),
                                                        (0.5, "none"), (0.5, f"fbcache:{SHORT_THRESHOLD}")]
    assert rows[0]["fidelity"] > 0.9999 and rows[2]["fidelity"] < 0.9999          # ToMA changed the image
    assert [r["computed_steps"] < SHORT for r in rows] == [False, True, False, True]
    assert all(r["cached_ms"] < r["step_ms"] for r in rows if r["cached_ms"] is not None)


def test_a_dynamic_split_serves_sizes_and_batches_and_triton_runs_it_unbatched(artifacts, cli_here, tmp_path):
    """export --cache --dynamic: one head/tail pair for the profile's sizes and batches; a batch of two decides
    together; the Triton pipeline of it takes one request per run (max_batch_size 1), where the unsplit dynamic
    export batches four."""
    meta = export_split("flux-tiny", te.ToMAConfig(), artifacts / "onnx", ExportOptions(dynamic=True),
                        progress=lambda m: None)
    assert meta["dynamic"] and meta["profiles"]["fbcache_hidden"]["max"][0] == 4
    session = Session(meta["onnx"], model="flux-tiny", cache=cache.CacheConfig(SHORT_THRESHOLD))
    for size in (128, 256):
        images = session.run([PROMPT, "a blue square on a black background"], [0, 1], size, size, SHORT, 3.5)
        assert [im.size for im in images] == [(size, size)] * 2
        assert 1 <= session.network.cache.computed < SHORT
    done = cli_here("export-repo", "--onnx", meta["onnx"], "--out", tmp_path / "repo", "--cache",
                    f"fbcache:{SHORT_THRESHOLD}", "--json")
    assert done.returncode == 0, done.stderr
    config = (tmp_path / "repo" / json.loads(done.stdout)["pipeline_model"] / "config.pbtxt").read_text()
    assert "max_batch_size: 1" in config and "dynamic_batching" not in config
