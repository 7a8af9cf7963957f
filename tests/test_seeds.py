"""The user-facing seed contract: an image's seed seeds its initial noise and nothing else, so every served path
draws, for a prompt and seed, what `load_pipeline` draws in PyTorch (up to the backend's float rounding).

Real layers: the trained tiny models, the `generate` command (run in this process), the `sweep` runner on ONNX
Runtime, ONNX Runtime itself and the shapes judge. The Triton path is held to the same reference in
test_triton_server.py. Unmerged (ratio 0), 28 steps at each model's default size (flux-tiny 256x256, sdxl-tiny
128x128): the settings of the sweep's reference row, whose accuracy docs/quality/<model>/sweep.json records.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import pipeline_image
from PIL import Image

import toma_export as te
from toma_export import shapes
from toma_export.quality import judge

SEEDS = range(6)
PER_SEED = 1                      # captions per seed, a different one at each seed
STEPS = 28
SIZE = {m: te.models.get(m).default_size[0] for m in ("flux-tiny", "sdxl-tiny")}   # as the sweeps drew (256, 128)
PIXEL_TOLERANCE = 4               # uint8 levels: ONNX Runtime against PyTorch over 28 steps (measured max 1)
SWEEPS = Path(__file__).resolve().parent.parent / "docs" / "quality"


def draws():
    grammar = shapes.grammar()
    return [(seed, grammar[(PER_SEED * seed + k) * 5 % len(grammar)]) for seed in SEEDS for k in range(PER_SEED)]


@pytest.fixture(scope="module")
def reference():
    """{model: [uint8 image per draw]}: the in-process PyTorch pipeline, one generator per image."""
    from toma_export.serve import load_pipeline

    cache = {}

    def get(model):
        if model not in cache:
            pipe = load_pipeline(model)
            pipe.set_progress_bar_config(disable=True)
            cache[model] = [pipeline_image(pipe, model, prompt, seed, SIZE[model], STEPS) for seed, prompt in draws()]
        return cache[model]

    return get


def sweep_reference_row(model) -> dict:
    rows = json.loads((SWEEPS / model / "sweep.json").read_text())["rows"]
    return next(r for r in rows if r["ratio"] == 0 and not r.get("cache"))


def assert_same_image(served, expected, model, path, seed, prompt):
    assert served.shape == expected.shape == (SIZE[model], SIZE[model], 3)
    diff = np.abs(served.astype(int) - expected.astype(int)).max()
    assert diff <= PIXEL_TOLERANCE, f"{path}: seed {seed}, {prompt!r}: {diff} levels from load_pipeline's image"


@pytest.mark.parametrize("model", ["flux-tiny", "sdxl-tiny"])
def test_generate_draws_what_the_pipeline_draws_at_every_seed(model, reference, cli_here, artifacts, tmp_path):
    """`toma-export generate --seed S` at seeds 0-5: each image is load_pipeline's for that seed, and the shapes
    judge finds in them what the sweep's unmerged row reports (colour and background always right, the shape
    at the sweep's accuracy less a binomial margin for 6 draws)."""
    served = []
    for i, (seed, prompt) in enumerate(draws()):
        out = tmp_path / f"{i}.png"
        done = cli_here("generate", "--model", model, "--no-toma", "--prompt", prompt, "--seed", seed, "--steps",
                        STEPS, "--size", f"{SIZE[model]}x{SIZE[model]}", "--output-dir", artifacts, "--out", out)
        assert done.returncode == 0, done.stderr
        served.append(np.asarray(Image.open(out).convert("RGB")))
    for (seed, prompt), a, b in zip(draws(), served, reference(model)):
        assert_same_image(a, b, model, "generate", seed, prompt)

    row = sweep_reference_row(model)
    found = judge.scores(judge.load(), [Image.fromarray(a) for a in served], [p for _, p in draws()])
    assert found["attributes"]["colour"] >= row["attributes"]["colour"], found
    assert found["attributes"]["background"] >= row["attributes"]["background"], found
    p, n = row["attributes"]["shape"], len(served)
    assert found["attributes"]["shape"] >= p - 2.5 * math.sqrt(p * (1 - p) / n), (found, row["attributes"])


def test_the_sweep_on_onnxruntime_draws_what_the_pipeline_draws(reference, artifacts):
    """The sweep's served runner (a Session, as generate and Triton use) at seeds 0 and 1."""
    from toma_export.quality.sweep import SweepRequest, sweep

    model, seeds = "flux-tiny", 2
    picked = [(s, p) for s, p in draws() if s < seeds]
    prompts = tuple(dict.fromkeys(p for _, p in picked))
    result = sweep(SweepRequest(model, ratios=(0.0,), backend="onnxruntime", prompts=prompts, seeds=seeds,
                                steps=STEPS, size=(SIZE[model], SIZE[model]), metrics="none",
                                output_dir=str(artifacts)),
                   progress=lambda m: None, quiet=True)
    drawn = {(s, p): np.asarray(im.convert("RGB")) for (p, s), im in zip(result["jobs"], result["images"][0])}
    expected = dict(zip(draws(), reference(model)))
    for seed, prompt in picked:
        assert_same_image(drawn[seed, prompt], expected[seed, prompt], model, "sweep", seed, prompt)
