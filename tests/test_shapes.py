"""The shapes world: its grammar, determinism, and that each image shows what its caption says (real PIL
drawing; the checks measure the pixels)."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

import toma_export as te
from toma_export import shapes


def test_the_grammar_has_every_combination_once_and_parses_back():
    captions = shapes.grammar()
    assert len(captions) == len(set(captions)) == 24
    assert "a yellow triangle on a white background" in captions
    for text in captions:
        assert shapes.caption(*shapes.parse(text)) == text
    for bad in ("a red fox", "a purple circle on a black background", "a red circle on a grey background",
                "a red circle on black background"):
        with pytest.raises(ValueError, match="not a caption of the shapes grammar"):
            shapes.parse(bad)


def test_images_follow_from_seed_and_index_alone():
    one, again, other = shapes.sample(3, 17), shapes.sample(3, 17), shapes.sample(4, 17)
    assert np.array_equal(np.asarray(one.image), np.asarray(again.image)) and one.caption == again.caption
    assert not np.array_equal(np.asarray(one.image), np.asarray(other.image))


@pytest.mark.parametrize("shape,area", [("circle", math.pi), ("square", 2.0), ("triangle", 3 * math.sqrt(3) / 4)])
def test_each_shape_covers_its_geometric_area(shape, area):
    size, radius = 64, 16.0
    image = np.asarray(shapes.draw(shape, (255, 0, 0), (0, 0, 0), (32.0, 30.0), radius, size, turn=0.3))
    covered = image[..., 0].astype(float).sum() / 255          # anti-aliased edges count in part
    assert covered == pytest.approx(area * radius ** 2, rel=0.03)


def test_every_sample_shows_its_caption():
    samples = [shapes.sample(0, i, size=64) for i in range(200)]
    for s in samples:
        pixels = np.asarray(s.image).reshape(-1, 3).astype(int)
        background = np.array(shapes.BACKGROUNDS[s.background])
        corners = np.asarray(s.image)[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert (corners == background).all(), s.caption               # the shape stays inside the frame
        colour = np.array(shapes.COLOURS[s.colour])
        exact = (np.abs(pixels - colour).sum(1) == 0).sum()
        assert exact >= 0.5 * math.pi * (0.16 * 64) ** 2 * 0.6, s.caption     # a solid patch of its colour
        others = [c for name, c in shapes.COLOURS.items() if name != s.colour]
        assert all((np.abs(pixels - np.array(c)).sum(1) == 0).sum() == 0 for c in others), s.caption
    counts = Counter((s.colour, s.shape, s.background) for s in samples)
    assert len(counts) == 24                                            # every combination occurs
    for attribute, values in (("colour", shapes.COLOURS), ("shape", shapes.SHAPES),
                              ("background", shapes.BACKGROUNDS)):
        seen = Counter(getattr(s, attribute) for s in samples)
        assert min(seen[v] for v in values) >= 0.5 * len(samples) / len(values), (attribute, seen)


def test_a_batch_is_a_training_tensor_with_labels():
    images, captions, labels = shapes.batch(seed=1, start=10, count=6, size=32)
    assert tuple(images.shape) == (6, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    for caption, (colour, shape, background) in zip(captions, labels.tolist()):
        assert shapes.parse(caption) == (list(shapes.COLOURS)[colour], shapes.SHAPES[shape],
                                         list(shapes.BACKGROUNDS)[background])
    assert captions == [shapes.sample(1, i, 32).caption for i in range(10, 16)]


@pytest.mark.parametrize("model", ["flux-tiny", "sdxl-tiny"])
def test_no_caption_of_the_grammar_is_cut_by_the_tiny_tokenizers(model):
    """Each tokenizer of the tiny pipeline, at the length the pipeline pads and cuts to (flux-tiny's T5: its 16
    text tokens), keeps every caption whole: the grammar's words are tokens of their own."""
    spec = te.models.get(model)
    parts = spec.tiny_parts()
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = parts[name]
        length = spec.text_len if (model, name) == ("flux-tiny", "tokenizer_2") else tokenizer.model_max_length
        for text in shapes.grammar():
            ids = tokenizer(text, max_length=length, truncation=True).input_ids
            assert tokenizer.decode(ids, skip_special_tokens=True) == text, (name, text)
            assert len(ids) <= 9                                 # <bos>, 7 words, <eos>


def test_a_sample_keeps_the_geometry_it_was_drawn_from():
    for i in range(60):
        s = shapes.sample(2, i, 48)
        again = shapes.draw(s.shape, shapes.COLOURS[s.colour], shapes.BACKGROUNDS[s.background], s.centre, s.radius,
                            48, s.turn)
        assert np.array_equal(np.asarray(again), np.asarray(s.image)), s.caption
        assert (s.turn != 0) == (s.shape == "triangle"), s          # only a triangle turns
    built = shapes.Sample(s.image, s.caption, s.colour, s.shape, s.background, s.centre, s.radius)
    assert built.turn == 0.0                                          # callers that predate the turn still build


def _boundary(mask):
    """Pixels whose 4-neighbourhood crosses the mask's edge, on either side."""
    padded = np.pad(mask, 1, mode="edge")
    differs = np.zeros_like(mask)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        differs |= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]] != mask
    return np.argwhere(differs)


def _distances(points, to):
    return np.sqrt(((points[:, None, :] - to[None, :, :]) ** 2).sum(-1)).min(1)


@pytest.mark.parametrize("shape,perimeter", [("circle", 2 * math.pi), ("square", 4 * math.sqrt(2)),
                                             ("triangle", 3 * math.sqrt(3))])
def test_the_control_image_outlines_the_drawn_shape(shape, perimeter):
    for i in range(6):
        s = shapes.sample(4, i, 64, shape=shape)
        control = np.asarray(s.control())
        assert control.shape == (64, 64, 3) and (control == control[..., :1]).all()      # RGB, grey
        lines = control[..., 0].astype(float) / 255
        assert lines.max() == 1 and lines[[0, 0, -1, -1], [0, -1, 0, -1]].sum() == 0    # white on black
        border = _boundary(s.mask())
        lit, bright = np.argwhere(lines > 0), np.argwhere(lines >= 0.5)
        assert _distances(bright, border).max() <= 1, s           # the line lies on the shape's border,
        assert _distances(lit, border).max() <= 2.5, s            # its faint fringe too (a sharp tip's reaches 2.2)
        assert _distances(border, bright).max() <= 1.5, s         # and it runs all the way round
        assert lines.sum() / (perimeter * s.radius) == pytest.approx(shapes.OUTLINE, rel=0.1), s    # 1-2 px wide


@pytest.mark.parametrize("shape,area", [("circle", math.pi), ("square", 2.0), ("triangle", 3 * math.sqrt(3) / 4)])
def test_the_mask_is_the_region_the_image_covers(shape, area):
    for turn in (0.0, 0.4, 1.9):
        mask = shapes.filled(shape, (30.6, 33.2), 14.3, 64, turn)
        red = np.asarray(shapes.draw(shape, (255, 0, 0), (0, 0, 0), (30.6, 33.2), 14.3, 64, turn))[..., 0]
        assert mask.dtype == bool and mask.shape == (64, 64)
        assert np.array_equal(mask, red >= 128)                   # the pixels the shape covers at least half
        assert mask.sum() == pytest.approx(area * 14.3 ** 2, rel=0.1)        # an edge along a row rounds as one
    with pytest.raises(ValueError, match="shape must be one of circle, square, triangle, got 'star'"):
        shapes.filled("star", (30.0, 30.0), 10.0, 64)


def test_a_control_batch_pairs_each_image_with_its_control_and_mask():
    images, controls, captions, masks = shapes.control_batch(seed=1, start=10, count=5, size=32)
    plain, plain_captions, _ = shapes.batch(seed=1, start=10, count=5, size=32)
    assert torch.equal(images, plain) and captions == plain_captions
    assert tuple(controls.shape) == (5, 3, 32, 32) and controls.min() == 0 and controls.max() == 1
    assert masks.shape == (5, 32, 32) and masks.dtype == bool
    for j, i in enumerate(range(10, 15)):
        s = shapes.sample(1, i, 32)
        assert np.array_equal(np.rint(controls[j].permute(1, 2, 0).numpy() * 255), np.asarray(s.control()))
        assert np.array_equal(masks[j], s.mask())
