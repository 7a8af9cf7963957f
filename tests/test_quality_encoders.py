"""CLIP-T and DINO encoders (toma_export.quality.encoders) on tiny random CLIP and DINOv2 folders.

The folders are written the way the hub's are (config.json, model.safetensors, tokenizer files,
preprocessor_config.json), so the code under test is the code that reads a downloaded openai/clip-* or
facebook/dinov2-* model; the expected values come from the models' own forward passes.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import in_hub_cache
from toma_export.errors import MissingComponent, UsageError
from toma_export.quality import encoders, judge

pytest.importorskip("transformers")

SEED = 1
WORDS = ["a", "red", "blue", "green", "circle", "square", "photo", "of", "on", "white"]
PROMPTS = ["a red circle", "a blue square on white", "photo of a green square"]


def _vocab_files(folder) -> tuple[str, str]:
    """vocab.json and merges.txt of a byte-level BPE for WORDS (every letter alone and word-final, each word
    merged whole), written into `folder`, as the hub's CLIP repositories hold them; returns their paths."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(set("".join(WORDS))):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def _tokenizer(folder):
    """A CLIPTokenizer from the files. transformers 5 takes their paths as `vocab` and `merges`; the names of
    transformers 4 (`vocab_file`, `merges_file`) are silently ignored there, leaving a three-token vocabulary.
    No model_max_length, as in some hub folders: the text length must come from the model's config."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_files(folder)
    return CLIPTokenizer(vocab=vocab, merges=merges)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"clip": folder, "dino": folder}: tiny random models saved with their processors, as on the hub."""
    from transformers import BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config, Dinov2Model

    base = tmp_path_factory.mktemp("encoders")
    tokenizer = _tokenizer(tmp_path_factory.mktemp("bpe"))
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        clip = CLIPModel(CLIPConfig(text_config=dict(tiny, vocab_size=len(tokenizer), max_position_embeddings=16,
                                                     bos_token_id=0, eos_token_id=1, pad_token_id=1),
                                    vision_config=dict(tiny, image_size=32, patch_size=8), projection_dim=16))
        dino = Dinov2Model(Dinov2Config(**tiny, image_size=32, patch_size=8))
    clip.save_pretrained(base / "clip")
    tokenizer.save_pretrained(base / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(base / "clip")
    dino.save_pretrained(base / "dino")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(base / "dino")
    return {"clip": base / "clip", "dino": base / "dino"}


def _images(count: int, seed: int = 0) -> list[Image.Image]:
    """Random RGB images of different, non-square sizes (the processors resize and crop them)."""
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(count)]


def test_tokenizer_fixture_merges_words(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    assert tokenizer.tokenize("A red  circle") == ["a</w>", "red</w>", "circle</w>"]
    assert tokenizer.unk_token_id not in tokenizer("photo of a green square")["input_ids"][1:-1]


def test_clip_t_is_the_clamped_cosine_of_each_pair(folders):
    from transformers import AutoProcessor, CLIPModel

    images = _images(3)
    pairs = [(im, p) for im in images for p in PROMPTS]
    scores = encoders.ClipScore(str(folders["clip"]), device="cpu").score(*map(list, zip(*pairs)))

    processor = AutoProcessor.from_pretrained(folders["clip"], local_files_only=True)
    model = CLIPModel.from_pretrained(folders["clip"], local_files_only=True).eval()
    out = model(pixel_values=processor.image_processor(images=images, return_tensors="pt")["pixel_values"],
                **processor.tokenizer(PROMPTS, padding=True, return_tensors="pt"))
    cos = (out.logits_per_image / model.logit_scale.exp()).flatten()      # (image, prompt) in the order of pairs
    assert (cos < 0).any() and (cos > 0).any(), "the seeded model should give both signs, so the clamp is tested"

    assert len(scores) == len(pairs) and all(0 <= s <= 100 for s in scores)
    np.testing.assert_allclose(scores, 100 * cos.clamp(min=0).numpy(), atol=1e-3)
    positive = [s for s in scores if s > 0]
    assert len(set(np.round(positive, 4))) >= 2, "the prompt must change the score"
    assert [s for s, c in zip(scores, cos) if c < 0] == [0.0] * int((cos < 0).sum())


def test_clip_t_changes_with_the_prompt_and_not_with_the_batch(folders):
    image = _images(3)[2]
    batched = encoders.ClipScore(str(folders["clip"]), device="cpu")
    one_by_one = encoders.ClipScore(str(folders["clip"]), device="cpu", batch=1)
    images, prompts = [image] * 3, PROMPTS
    scores = batched.score(images, prompts)
    assert len(set(np.round(scores, 4))) == 3, scores
    np.testing.assert_allclose(one_by_one.score(images, prompts), scores, atol=1e-4)
    # a prompt longer than the text tower's positions is cut to them, not an indexing error
    long = batched.score([image], [" ".join(WORDS * 5)])
    assert len(long) == 1 and 0 <= long[0] <= 100
    assert batched.score([], []) == []
    with pytest.raises(UsageError, match="2 images and 1 prompts"):
        batched.score([image, image], ["a red circle"])


def test_dino_features_are_the_cls_token(folders):
    from transformers import AutoImageProcessor, Dinov2Model

    a, b = _images(2, seed=3)
    dino = encoders.DinoFeatures(str(folders["dino"]), device="cpu", batch=2)
    feats = dino.features([a, a.copy(), b])
    assert feats.shape == (3, 32) and feats.dtype == torch.float32

    processor = AutoImageProcessor.from_pretrained(folders["dino"], local_files_only=True)
    model = Dinov2Model.from_pretrained(folders["dino"], local_files_only=True).eval()
    expected = model(pixel_values=processor(images=[a, a, b], return_tensors="pt")["pixel_values"]).pooler_output
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)

    assert judge.fidelity(feats[:1], feats[1:2]) == pytest.approx(1.0, abs=1e-6)
    assert judge.fidelity(feats[:1], feats[2:]) < 0.99
    assert encoders.fidelity is judge.fidelity and encoders.frechet is judge.frechet
    assert dino.features([]).shape == (0, 32)


def test_cached_hub_id_loads_offline(folders, tmp_path, monkeypatch):
    in_hub_cache(folders["clip"], "someone/tiny-clip", tmp_path, monkeypatch)
    image = _images(1)
    from_hub = encoders.ClipScore("someone/tiny-clip", device="cpu").score(image, PROMPTS[:1])
    from_folder = encoders.ClipScore(str(folders["clip"]), device="cpu").score(image, PROMPTS[:1])
    assert from_hub == pytest.approx(from_folder, abs=1e-5)


def _refused(cls, source, error, match):
    with pytest.raises(error, match=match) as info:
        cls(source, device="cpu")
    assert "\n" not in str(info.value), "one line"
    return str(info.value)


def test_a_missing_folder_or_a_file_is_refused(tmp_path):
    _refused(encoders.ClipScore, str(tmp_path / "nothere"), UsageError,
             r"--clip .*nothere: no such folder.*pass a CLIP model folder.*openai/clip-vit-large-patch14")
    (tmp_path / "model.safetensors").write_bytes(b"")
    _refused(encoders.DinoFeatures, str(tmp_path / "model.safetensors"), UsageError,
             r"--dino .* is a file; pass the DINOv2 model folder that holds it")
    _refused(encoders.DinoFeatures, str(tmp_path), UsageError, r"no config.json in .*DINOv2 model folder")


def test_another_model_type_is_refused_before_loading(folders):
    """transformers itself would load the CLIP folder as a Dinov2Model with random weights and a warning."""
    _refused(encoders.DinoFeatures, str(folders["clip"]), UsageError,
             r"--dino .*its config.json is a 'clip' model, not DINOv2 .*pass a DINOv2 model, e\.g\. facebook/dinov2")
    _refused(encoders.ClipScore, str(folders["dino"]), UsageError,
             r"--clip .*its config.json is a 'dinov2' model, not CLIP .*e\.g\. openai/clip-vit-large-patch14")


def test_an_uncached_hub_id_is_refused(tmp_path, monkeypatch):
    from huggingface_hub import constants

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("HF_HOME", str(empty))
    monkeypatch.setenv("HF_HUB_CACHE", str(empty / "hub"))
    # huggingface_hub reads the environment once, at import: the cache it uses is this constant
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(empty / "hub"))
    message = _refused(encoders.ClipScore, "someone/not-downloaded", MissingComponent,
                       r"not in the local Hugging Face cache .*huggingface-cli download someone/not-downloaded")
    assert str(empty / "hub") in message


def test_missing_weights_or_processor_are_refused(folders, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folders["dino"] / "config.json", bare)
    _refused(encoders.DinoFeatures, str(bare), MissingComponent,
             r"--dino .*bare: config.json but no weights \(\*.safetensors or pytorch_model\*.bin\) .*copy the weights")
    shutil.copy(folders["dino"] / "model.safetensors", bare)
    _refused(encoders.DinoFeatures, str(bare), MissingComponent,
             r"no image processor \(preprocessor_config.json or processor_config.json\) .*download the whole model")
    clip = tmp_path / "clip"
    shutil.copytree(folders["clip"], clip)
    (clip / "tokenizer.json").unlink()
    _refused(encoders.ClipScore, str(clip), MissingComponent, r"--clip .*: config.json but no tokenizer .*copy the")
    (clip / "tokenizer.json").write_text("{not json")
    _refused(encoders.ClipScore, str(clip), MissingComponent, r"--clip .*: could not load its processor .*download")


def test_sweep_scores_clip_t_and_dino_from_folders(folders, tmp_path, capsys):
    """`sweep --metrics clip` on flux-tiny with the tiny CLIP and DINOv2 folders: the rows carry CLIP-T and DINO
    fidelity, named as such, and ratio 0 is its own DINO reference."""
    from toma_export.cli import main

    assert main(["sweep", "--model", "flux-tiny", "--ratios", "0,0.5", "--prompt", "a red circle", "--steps", "2",
                 "--metrics", "clip", "--clip", str(folders["clip"]), "--dino", str(folders["dino"]),
                 "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    base, merged = result["rows"]
    assert base["dino"] == pytest.approx(1.0) and 0 < merged["dino"] <= 1.0 + 1e-6
    assert all(0 <= r["clip_t"] <= 100 and "accuracy" not in r for r in result["rows"])
    assert set(result["metric_names"]) == {"clip_t", "dino"} and "CLIP" in result["metric_names"]["clip_t"]
