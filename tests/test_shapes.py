"""The shapes world: its grammar, determinism, and that each image shows what its caption says (real PIL
drawing; the checks measure the pixels)."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

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
