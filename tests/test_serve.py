"""Serving: tiny diffusers pipelines whose network is an exported ToMA graph in ONNX Runtime, against the
same pipelines running the PyTorch ToMA patch; schedules with unmerged steps; shape errors; the CLI.

One ToMA export and one baseline export per tiny model (128x128 px; SDXL at batch 2 for its CFG batch),
shared by every test through the session's artifact folder."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import toma_export as te
from toma_export.cli import main
from toma_export.onnx import ExportOptions, export
from toma_export.parity.metrics import compare, tolerance
from toma_export.serve import load_network, load_pipeline
from toma_export.serve.pipeline import attach

SIZE = 128
STEPS = 4
BATCH = {"flux-tiny": 1, "sdxl-tiny": 2}          # SDXL runs CFG (guidance 5): the UNet sees batch 2


@pytest.fixture(scope="module")
def exports(artifacts):
    cache = {}

    def get(model):
        if model not in cache:
            options = ExportOptions(height=SIZE, width=SIZE, batch=BATCH[model])
            quiet = lambda m: None  # noqa: E731
            cache[model] = (export(model, te.ToMAConfig(), artifacts / "onnx", options, progress=quiet)["onnx"],
                            export(model, None, artifacts / "onnx", options, progress=quiet)["onnx"])
        return cache[model]

    return get


def _call(model, size=SIZE, guidance=None):
    kw = dict(height=size, width=size, num_inference_steps=STEPS, output_type="latent")
    if model == "flux-tiny":
        kw["max_sequence_length"] = 16
    else:
        kw["guidance_scale"] = 5.0 if guidance is None else guidance
    return kw


def _generate(pipe, model, prompt="a red fox", seed=2, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **_call(model, **kw)).images


def _reference(model, config):
    pipe = load_pipeline(model)
    te.apply_toma(pipe, config)
    return _generate(pipe, model)


SCHEDULES = {"every step": te.ToMAConfig(), "merge_steps=2, dst_every=2": te.ToMAConfig(merge_steps=2, dst_every=2)}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("model", ["flux-tiny", "sdxl-tiny"])
def test_served_pipeline_matches_pytorch_toma(exports, model, schedule):
    config = SCHEDULES[schedule]
    toma_onnx, base_onnx = exports(model)
    ref = _reference(model, config)
    network = load_network(toma_onnx, base_onnx if config.merge_steps else None, schedule=config)
    pipe = load_pipeline(model, network=False)
    attach(pipe, network)
    assert (pipe.transformer if model == "flux-tiny" else pipe.unet) is network
    atol, rtol = tolerance("loop", "fp32")
    for generation in range(2):         # the second one must start over (timestep goes up), not carry on
        out = _generate(pipe, model)
        result = compare(ref.numpy(), out.numpy(), atol, rtol)
        assert result["passed"], (generation, result)
    per_gen = {k: v // 2 for k, v in network.calls.items()}
    if config.merge_steps:
        # steps 0 and 2 merge; step 2 reuses step 0's destinations across the unmerged step 1 (dst_every=2)
        assert per_gen == {"toma": 2, "baseline": 2, "recompute": 1, "cached": 0}
        assert network.sharing.shared > 0 and network.sharing.unshared_bytes == 0
    else:
        assert per_gen == {"toma": STEPS, "baseline": 0, "recompute": STEPS, "cached": 0}


def test_toma_changes_the_result(exports):
    """The served ToMA graph is not the baseline in disguise: its latents differ from the unmerged run."""
    toma_onnx, base_onnx = exports("flux-tiny")
    outs = []
    for path in (toma_onnx, base_onnx):
        pipe = load_pipeline("flux-tiny", network=False)
        attach(pipe, load_network(path))
        outs.append(_generate(pipe, "flux-tiny"))
    assert not torch.allclose(outs[0], outs[1], rtol=1e-3, atol=1e-3)


def test_size_outside_the_static_export_is_refused(exports):
    pipe = load_pipeline("flux-tiny", network=False)
    attach(pipe, load_network(exports("flux-tiny")[0]))
    with pytest.raises(ValueError, match=r"input hidden_states has shape \(1, 16, 16, 16\) \(image 256x256 px\), "
                                         r"but the static export takes exactly \(1, 8, 8, 16\).*re-export"):
        _generate(pipe, "flux-tiny", size=256)


def test_batch_outside_the_static_export_is_refused(exports):
    pipe = load_pipeline("sdxl-tiny", network=False)
    attach(pipe, load_network(exports("sdxl-tiny")[0]))
    with pytest.raises(ValueError, match=r"input sample has shape \(1, 4, 16, 16\).*exactly \(2, 4, 16, 16\).*"
                                         r"batch 2, CFG counts twice"):
        _generate(pipe, "sdxl-tiny", guidance=1.0)     # no CFG: batch 1


def test_unmerged_steps_need_the_baseline(exports):
    with pytest.raises(ValueError, match="merge_steps=2 leaves steps unmerged.*baseline"):
        load_network(exports("flux-tiny")[0], schedule=te.ToMAConfig(merge_steps=2))
    with pytest.raises(ValueError, match="only merge_steps, dst_every and weights_every"):
        load_network(exports("flux-tiny")[0], schedule=te.ToMAConfig(ratio=0.25))


def test_generate_writes_a_png(exports, artifacts, tmp_path, capsys):
    """Without --onnx the CLI finds the fixture's export in its cache (same model, settings and size)."""
    out = tmp_path / "fox.png"
    code = main(["generate", "--model", "flux-tiny", "--prompt", "a red fox", "--steps", "2", "--size",
                 f"{SIZE}x{SIZE}", "--output-dir", str(artifacts), "--out", str(out), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["onnx_or_engine"] == exports("flux-tiny")[0]
    assert result["calls"] == {"toma": 2, "baseline": 0, "recompute": 2, "cached": 0}
    assert set(result["latency_ms"]) >= {"text_encode", "denoise_total", "denoise_per_step", "vae_decode", "total"}
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (SIZE, SIZE)
    assert np.asarray(image).std() > 0


def test_generate_with_a_lora_exports_weights_only_and_changes_the_image(exports, artifacts, tmp_path, capsys):
    """--lora: the fixture's graph is reused (only the weights are written), the LoRA changes the picture, and
    files given with --onnx carry their own weights, so --lora is refused beside them."""
    from loras import peft_lora

    lora = peft_lora("flux-tiny", tmp_path / "lora", seed=7)
    images = []
    for extra in ([], ["--lora", f"{lora}:1.5"]):
        out = tmp_path / f"fox{len(images)}.png"
        assert main(["generate", "--model", "flux-tiny", "--prompt", "a red fox", "--steps", "2", "--size",
                     f"{SIZE}x{SIZE}", "--output-dir", str(artifacts), "--out", str(out), "--json", *extra]) == 0
        result = json.loads(capsys.readouterr().out)
        images.append(np.asarray(Image.open(out)).astype(int))
    assert result["loras"] == [dict(file=str(lora), scale=1.5)] and result["onnx_or_engine"] != exports("flux-tiny")[0]
    meta = json.loads(Path(result["onnx_or_engine"]).with_name("toma.json").read_text())
    assert meta["graph_from"] and meta["weights"]["loras"][0]["scale"] == 1.5
    assert np.abs(images[0] - images[1]).mean() > 1
    code = main(["generate", "--model", "flux-tiny", "--onnx", exports("flux-tiny")[0], "--lora", str(lora),
                 "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "x.png")])
    assert code != 0 and "carry their own weights; drop --lora" in capsys.readouterr().err


def test_generate_with_given_files_and_schedule(exports, tmp_path, capsys):
    toma_onnx, base_onnx = exports("sdxl-tiny")
    out = tmp_path / "sdxl.png"
    code = main(["generate", "--model", "sdxl-tiny", "--onnx", toma_onnx, "--baseline", base_onnx, "--merge-steps",
                 "2", "--prompt", "a red fox", "--steps", "3", "--size", f"{SIZE}x{SIZE}", "--out", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "2 merged call(s) (2 selecting), 1 unmerged" in table and "VAE decode" in table
    assert Image.open(out).size == (SIZE, SIZE)


def test_generate_reports_a_bad_size_in_one_line(exports, tmp_path, capsys):
    code = main(["generate", "--model", "flux-tiny", "--onnx", exports("flux-tiny")[0], "--prompt", "x", "--steps",
                 "1", "--size", "256x256", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("toma-export: error: ") and "hidden_states" in err
    assert not (tmp_path / "x.png").exists()


def test_dynamic_export_serves_every_size_in_its_profile(dynamic_export):
    """One dynamic export (the session's, shared with the engine tests) serves sizes across its profile,
    non-square ones included, and refuses a size past its maximum with the profile range in the message."""
    meta = dynamic_export("flux-tiny")
    (h0, w0), _, (h1, w1) = meta["ranges"]["sizes"]
    pipe = load_pipeline("flux-tiny", network=False)
    attach(pipe, load_network(meta["onnx"]))
    for size in ((h0, w0), (h1, w0)):
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a red fox", height=size[0], width=size[1], num_inference_steps=2, max_sequence_length=16,
                   output_type="latent", generator=torch.Generator().manual_seed(0)).images
        assert out.shape[1] == (size[0] // 16) * (size[1] // 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=rf"but the profile allows .*\({h0}x{w0} to {h1}x{w1} px.*--dynamic --min-size"):
        pipe("a red fox", height=2 * h1, width=2 * w1, num_inference_steps=1, max_sequence_length=16,
             output_type="latent")
