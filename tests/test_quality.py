"""The trained tiny models, the shapes judge and `toma-export sweep`: the committed weights load by default and
draw their captions, the judge is as accurate as its figure says, a small sweep writes its files, and the
control measure finds where a shape was drawn. Real layers throughout: diffusers pipelines, the committed
safetensors, the judge network, matplotlib."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import toma_export as te
from toma_export.families import tiny
from toma_export import shapes
from toma_export.quality import judge


@pytest.mark.parametrize("name", ["flux-tiny", "sdxl-tiny"])
def test_the_tiny_models_load_their_trained_weights_by_default(name):
    assert tiny.trained_file(name) and tiny.trained_file("vae-tiny"), "make train-tiny writes the weights"
    spec = te.models.get(name)
    trained, random = spec.load().state_dict(), spec.load(trained=False).state_dict()
    stored = tiny.trained_weights(name)
    assert set(stored) == set(trained) and all(torch.equal(stored[k], trained[k]) for k in trained)
    assert any(not torch.equal(trained[k], random[k]) for k in trained)
    assert spec.base_label().startswith(f"trained weights ({name}.safetensors, sha256 ")
    vae = spec.tiny_parts()["vae"]
    key = "decoder.conv_out.weight"
    assert torch.equal(vae.state_dict()[key], tiny.trained_weights("vae-tiny")[key])
    stats = tiny.latent_stats()
    assert vae.config.scaling_factor == pytest.approx(tiny.factors(stats, spec.family)["scaling_factor"])


def test_the_judge_reaches_99_percent_on_the_held_out_set():
    figures = judge.held_out_accuracy(judge.load())
    assert figures["images"] == 1200 and figures["all"] >= 0.99, figures
    recorded = json.loads((tiny.WEIGHTS / "training.json").read_text())["judge"]["held_out"]
    assert recorded["all"] == pytest.approx(figures["all"])       # the figure the README quotes is this one


def test_the_judge_metrics():
    model = judge.load()
    x, captions, _ = shapes.batch(7, 0, 80, 128)
    assert judge.prompt_accuracy(model, x, captions) >= 0.98
    wrong = [shapes.caption("green" if c.split()[1] != "green" else "red", *shapes.parse(c)[1:]) for c in captions]
    assert judge.prompt_accuracy(model, x, wrong) <= 0.02                # a wrong colour fails the caption
    feats = judge.features(model, x)
    assert judge.fidelity(feats, feats) == pytest.approx(1.0)
    assert judge.fidelity(feats, judge.features(model, torch.flip(x, dims=(0,)))) < 0.9
    assert judge.frechet(feats, feats) == pytest.approx(0.0, abs=1e-6)
    other = judge.features(model, shapes.batch(8, 0, 80, 128)[0])
    same_world, shifted = judge.frechet(feats, other), judge.frechet(feats, judge.features(model, -x))
    assert 0 < same_world < shifted
    assert judge.frechet(feats[:judge.FEATURES], feats[:judge.FEATURES]) is None     # too few for a covariance


# What the committed weights draw at generate's defaults (28 steps, the model's size: flux-tiny 256x256, sdxl-tiny
# 128x128), 8 captions spread over the grammar, seed 0, PyTorch; floors a little under what they scored when trained
# (docs/quality.md has the sweeps).
DRAWS = {("flux-tiny", False): dict(accuracy=0.75, colour=0.85, background=0.85),
         ("flux-tiny", True): dict(accuracy=0.375, colour=0.85, background=0.85),  # ToMA 0.5 every step costs shapes
         ("sdxl-tiny", False): dict(accuracy=0.5, colour=0.85, background=0.85)}


@pytest.mark.parametrize("name,toma", list(DRAWS))
def test_a_trained_model_draws_its_captions(name, toma):
    from toma_export.serve.pipeline import load_pipeline

    pipe = load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    if toma:
        te.apply_toma(pipe)            # the default ratio, 0.5
    spec = te.models.get(name)
    captions = shapes.grammar()[::3]
    height, width = spec.default_size
    images = [pipe(c, height=height, width=width, num_inference_steps=28, generator=torch.Generator().manual_seed(0),
                   guidance_scale=spec.default_guidance, **spec.pipeline_kwargs()).images[0] for c in captions]
    model = judge.load()
    scored = dict(judge.attribute_accuracy(model, images, captions), accuracy=judge.prompt_accuracy(model, images,
                                                                                                   captions))
    assert all(scored[k] >= floor for k, floor in DRAWS[name, toma].items()), scored


def test_sweep_writes_its_files_and_json(tmp_path):
    from toma_export.cli import main

    out = tmp_path / "sweep"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background\n\na blue triangle on a black background\n")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["sweep", "--model", "flux-tiny", "--ratios", "0.5,0", "--prompts", str(prompts), "--steps", "3",
                     "--out", str(out), "--json"]) == 0
    result = json.loads(buf.getvalue())
    rows = result["rows"]
    assert [r["ratio"] for r in rows] == [0.0, 0.5]
    base, merged = rows
    assert base["fidelity"] == pytest.approx(1.0) and base["speedup"] == 1.0 and base["images"] == 2
    assert 0 < merged["fidelity"] <= 1 and merged["step_ms"] > 0 and merged["speedup"] > 0
    assert all(0 <= r["accuracy"] <= 1 and r["frechet"] is None for r in rows)     # 2 images: no Fréchet
    assert all(set(r["attributes"]) == {"colour", "shape", "background"} and
               min(r["attributes"].values()) >= r["accuracy"] for r in rows)
    assert "stand-in for CLIP-T" in result["metric_names"]["accuracy"]
    files = {k: Path(v) for k, v in result["files"].items()}
    assert set(files) == {"json", "pareto", "grid", "html"} and all(f.parent == out for f in files.values())
    assert json.loads(files["json"].read_text())["rows"] == rows
    with Image.open(files["grid"]) as grid:
        assert grid.width > 2 * 128 and grid.height >= 2 * 128
    assert Image.open(files["pareto"]).format == "PNG"
    page = files["html"].read_text()
    assert "pareto.png" in page and "grid.png" in page and "prompt accuracy" in page
    assert not list(out.glob("*.tmp*"))


def test_sweep_measures_speed_only_with_metrics_none(tmp_path, capsys):
    from toma_export.cli import main

    assert main(["sweep", "--model", "sdxl-tiny", "--ratios", "0,0.5", "--prompt", "a lighthouse", "--steps", "2",
                 "--levels", "2", "--metrics", "none", "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [set(r) for r in result["rows"]] == [{"ratio", "step_ms", "speedup", "image_s", "image_speedup",
                                                 "images"}] * 2
    assert json.loads((tmp_path / "sweep.json").read_text())["toma"] == {"levels": 2}


@pytest.mark.parametrize("args,message", [
    (["--model", "flux-tiny", "--prompt", "a red fox"], "not a caption of the shapes grammar"),
    (["--model", "flux-tiny", "--ratios", "0,1"], "--ratios must be shares in [0, 1)"),
    (["--model", "flux-tiny", "--ratio", "0.5"], "takes --ratios"),
    (["--model", "flux-tiny", "--metrics", "clip"], "need --clip and --dino"),
    (["--model", "flux-tiny", "--seeds", "0"], "must be >= 1"),
    (["--model", "flux-tiny", "--metrics", "judge", "--levels", "0"], "levels"),
])
def test_sweep_refusals(tmp_path, capsys, args, message):
    from toma_export.cli import main

    assert main(["sweep", *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_training_refuses_a_bad_thread_count(capsys):
    from toma_export.quality import train

    with pytest.raises(SystemExit) as exit_:
        train.main(["--threads", "0"])
    assert exit_.value.code == 2 and "--threads must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("omp, expected", [("3", 3), ("", os.cpu_count()), ("two", os.cpu_count())])
def test_training_takes_its_threads_from_omp_num_threads_else_every_core(monkeypatch, omp, expected):
    from toma_export.quality import train

    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert train.default_threads() == expected


def test_training_runs_end_to_end_in_a_few_steps(tmp_path):
    """`make train-tiny` at a handful of steps, as it runs on two cores: the networks train at the same time in two
    spawned processes of one thread each. Every file is written, the record holds the judge's figures, and
    `--only` trains the same weights again in this process."""
    from toma_export.quality import train

    few = ["--images", "32", "--flux-steps", "2", "--sdxl-steps", "2", "--eval-seeds", "1", "--eval-steps", "1",
           "--images-256", "16", "--flux-steps-256", "2", "--threads", "2", "--quiet"]
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)                   # a caller with a setting of its own keeps it
    try:
        assert train.main(["--out", str(tmp_path), "--vae-steps", "2", "--judge-steps", "2", *few]) == 0
        assert torch.get_num_threads() == threads + 1
        together = (tmp_path / "flux-tiny.safetensors").read_bytes()
        assert train.main(["--out", str(tmp_path), "--only", "flux-tiny", *few]) == 0
        assert (tmp_path / "flux-tiny.safetensors").read_bytes() == together      # one thread either way
        assert torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)
    assert {p.name for p in tmp_path.iterdir()} == {"judge.safetensors", "vae-tiny.safetensors", "training.json",
                                                   "flux-tiny.safetensors", "sdxl-tiny.safetensors"}
    record = json.loads((tmp_path / "training.json").read_text())
    assert 0 <= record["judge"]["held_out"]["all"] <= 1
    assert record["threads"] == 2 and "minutes (flux-tiny alone)" in record
    for name in ("flux-tiny", "sdxl-tiny"):
        assert set(record[name]["prompt_accuracy"]) == {"baseline", "toma"} and record[name]["threads"] == 1
    assert [(p["size"], p["images"]) for p in record["flux-tiny"]["phases"]] == [(128, 32), (256, 16)]
    assert [p["size"] for p in record["sdxl-tiny"]["phases"]] == [128]
    from safetensors.torch import load_file

    flux = load_file(str(tmp_path / "flux-tiny.safetensors"))
    assert all(v.dtype == torch.float16 for v in flux.values())         # half the bytes in the wheel
    assert set(flux) == set(te.models.get("flux-tiny").load().state_dict())
    # the 256-px phase alone, from given 128-px weights: how the shipped flux-tiny was made from the previous one's
    start = tmp_path / "start.safetensors"
    start.write_bytes(together)
    assert train.main(["--out", str(tmp_path), "--only", "flux-tiny", "--flux-start", str(start), *few]) == 0
    record = json.loads((tmp_path / "training.json").read_text())["flux-tiny"]
    assert [p["size"] for p in record["phases"]] == [256] and record["start"] == str(start)
    assert (tmp_path / "flux-tiny.safetensors").read_bytes() != together
    with pytest.raises(SystemExit, match="no such file"):
        train.main(["--out", str(tmp_path), "--only", "flux-tiny", "--flux-start", str(tmp_path / "none"), *few])


def test_controlnet_training_runs_in_a_few_steps(tmp_path, monkeypatch):
    """`python -m toma_export.quality.train_controlnet` (make train-tiny's last part) at a handful of steps on the
    shipped networks: the ControlNet is written in half precision and scored with and without ToMA; its ToMA-aware
    phase merges network and ControlNet in every other batch; `--aware-only` starts from the ControlNet in --out."""
    import shutil

    from safetensors.torch import load_file

    from toma_export import toma
    from toma_export.quality import train_controlnet

    for name in ("vae-tiny", "flux-tiny", "flux-tiny-controlnet"):
        shutil.copy(tiny.WEIGHTS / f"{name}.safetensors", tmp_path)
    merged = []
    apply = toma.apply_toma
    monkeypatch.setattr(toma, "apply_toma", lambda m, *a: merged.append(type(m).__name__) or apply(m, *a))
    few = ["--out", str(tmp_path), "--only", "flux-tiny-controlnet", "--images", "8", "--eval-count", "1",
           "--eval-steps", "1", "--threads", "1", "--quiet"]
    assert train_controlnet.main([*few, "--steps", "2", "--aware-steps", "2"]) == 0
    # one merged batch of the two aware steps, and the scoring's ToMA run; each patches network and ControlNet
    assert merged == ["FluxTransformer2DModel", "FluxControlNetModel"] * 2
    first = (tmp_path / "flux-tiny-controlnet.safetensors").read_bytes()
    weights = load_file(str(tmp_path / "flux-tiny-controlnet.safetensors"))
    assert all(v.dtype == torch.float16 for v in weights.values())
    assert set(weights) == set(te.models.get("flux-tiny-controlnet").load().state_dict())
    record = json.loads((tmp_path / "training.json").read_text())["flux-tiny-controlnet"]
    assert (record["steps"], record["aware_steps"], record["aware_only"]) == (2, 2, False)
    assert set(record["control"]) == {"baseline", "toma"} and record["control"]["toma"]["images"] == 1
    assert train_controlnet.main([*few, "--aware-only", "--aware-steps", "2"]) == 0
    assert (tmp_path / "flux-tiny-controlnet.safetensors").read_bytes() != first
    assert json.loads((tmp_path / "training.json").read_text())["flux-tiny-controlnet"]["aware_only"]
    with pytest.raises(SystemExit):
        train_controlnet.main([*few[:2], "--only", "sdxl-tiny-controlnet", "--aware-only"])


# The control measure: no network, only the drawn pixels against the control's mask.

def test_the_control_measure_finds_a_drawn_shape_on_its_own_mask():
    rng = np.random.default_rng(0)
    for i, text in enumerate(shapes.grammar() * 2):                    # every colour, shape and background
        s = shapes.sample(9, i, 64, *shapes.parse(text))
        found = judge.control_scores(s.image, s.mask(), s.caption)
        assert found["iou"] > 0.9 and found["centroid"] < 0.02, (text, found)
        assert judge.control_scores(np.asarray(s.image), s.mask()) == found      # the corners tell the background
        soft = np.asarray(s.image.filter(ImageFilter.GaussianBlur(1)), dtype=float) + rng.normal(0, 20, (64, 64, 3))
        soft = judge.control_scores(np.clip(soft, 0, 255).astype(np.uint8), s.mask())     # as a model draws
        assert soft["iou"] > 0.8 and soft["centroid"] < 0.02, (text, soft)


def test_the_control_measure_scores_a_misplaced_shape_low():
    colour, background = shapes.COLOURS["red"], shapes.BACKGROUNDS["white"]
    mask = shapes.filled("square", (46.0, 46.0), 10.0, 64)
    far = judge.control_scores(shapes.draw("square", colour, background, (18.0, 18.0), 10.0, 64), mask)
    assert far["iou"] == 0 and far["centroid"] == pytest.approx(28 * 2 ** 0.5 / 64, abs=0.01)
    near = judge.control_scores(shapes.draw("square", colour, background, (40.0, 46.0), 10.0, 64), mask)
    assert 0.2 < near["iou"] < 0.7 and near["centroid"] == pytest.approx(6 / 64, abs=0.01)     # graded, not all or none


@pytest.mark.parametrize("background", ["black", "white"])
def test_an_all_background_image_scores_no_control(background):
    mask = shapes.sample(3, 0, 64).mask()
    empty = Image.new("RGB", (64, 64), shapes.BACKGROUNDS[background])
    assert judge.control_scores(empty, mask) == {"iou": 0.0, "centroid": None}
    s = shapes.sample(3, 1, 64)
    mean = judge.mean_control_scores([s.image, empty], [s.mask(), mask])
    one = judge.control_scores(s.image, s.mask())
    assert mean == {"iou": pytest.approx(one["iou"] / 2), "centroid": one["centroid"], "images": 2, "missing": 1}


def test_the_control_measure_refuses_what_it_cannot_compare():
    s = shapes.sample(3, 0, 64)
    for args, message in [((s.image, shapes.sample(3, 0, 32).mask()), "the image is 64x64 but its mask 32x32"),
                          ((s.image, s.mask().astype(np.uint8)), "the mask must be a 2-D bool array, got uint8"),
                          ((s.image, np.zeros((64, 64), bool)), "the mask covers no pixel"),
                          ((np.asarray(s.image) / 255, s.mask()), "a (height, width, 3) uint8 array, got float64")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            judge.control_scores(*args)
    with pytest.raises(ValueError, match="got 1 images, 2 masks, 1 captions"):
        judge.mean_control_scores([s.image], [s.mask(), s.mask()], [s.caption])
