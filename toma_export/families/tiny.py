"""The tiny pipelines' parts (text encoders, tokenizers, VAE) the families assemble for flux-tiny and sdxl-tiny,
and the trained weights they load by default.

Why: `generate` and the serving tests need a whole diffusers pipeline on a machine without a model hub. The
networks and the VAE are trained on the shapes world (`make train-tiny`, toma_export/quality/train.py); their
weights ship in the package under models/weights/. The text encoders stay random and frozen (the networks
learned to read them), so they are rebuilt from their seeds rather than stored.
The widths match the tiny networks (FLUX: T5 width = joint_attention_dim, CLIP pooled width =
pooled_projection_dim; SDXL: the two CLIP widths sum to cross_attention_dim, the projection is the pooled
text width in projection_class_embeddings_input_dim), the VAE downsamples 8x like the real ones, and the
tokenizers are built here from a generated vocabulary (lowercase letters, digits, their word-piece
continuations and punctuation), so nothing is downloaded. Every part is seeded from ENCODER_SEED, the seed the
trained networks' text encoders were built from: other encoders would feed them noise for the caption.
"""
from __future__ import annotations

import hashlib
import json
import string
from pathlib import Path

import torch

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS = 0, 1, 2
CLIP_LEN = 77                   # the CLIP context both pipelines pad to
WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "weights"
ENCODER_SEED = 0                # the frozen text encoders the trained networks read (never an image's seed)
VAE_CHANNELS, VAE_GROUPS = (8, 16, 16, 16), 2      # 2 groups: per-channel norms (8) wash out colour


def trained_file(name: str) -> Path | None:
    """The committed weights of a tiny network or part (flux-tiny, sdxl-tiny, vae-tiny), if present."""
    path = WEIGHTS / f"{name}.safetensors"
    return path if path.is_file() else None


def trained_weights(name: str) -> dict | None:
    """{name: fp32 tensor} of a committed weights file (stored in fp16 to keep the wheel small), or None."""
    path = trained_file(name)
    if path is None:
        return None
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path)).items()}


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def latent_stats() -> dict | None:
    """{"mean", "std"} of the trained VAE's latents over the shapes world, from its file's metadata."""
    path = trained_file("vae-tiny")
    if path is None:
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["latents"])


def vocabulary() -> list[str]:
    """Characters and their word-piece continuations, so any text tokenizes, plus the shapes grammar's words
    as whole tokens, so that every caption of it fits flux-tiny's 16 text tokens (by characters, "a green
    circle on a black background" alone takes 36)."""
    from ..shapes import grammar

    chars = list(string.ascii_lowercase + string.digits)
    words = sorted({w for text in grammar() for w in text.split()} - set(chars))
    return list(SPECIALS) + chars + ["##" + c for c in chars] + list(".,!?'-:;()") + words


def tokenizer(max_length: int = CLIP_LEN):
    """A word-piece tokenizer over single characters, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocabulary())}, unk_token="<unk>",
                                     max_input_chars_per_word=64))
    tok.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", BOS), ("<eos>", EOS)])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length)


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def clip(hidden: int, seed: int, projection: int | None = None):
    """CLIP text encoder of width `hidden`; with `projection`, the model with a text projection (SDXL's 2nd)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(vocabulary()), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_LEN,
                            projection_dim=projection or hidden, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return _seeded(seed, lambda: cls(config))


def t5(width: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(vocabulary()), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2,
                      num_heads=4, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD)
    return _seeded(seed, lambda: T5EncoderModel(config))


def factors(stats: dict | None, family: str) -> dict:
    """The VAE config's factors that give the network latents of mean 0 and std 1: FLUX's pipeline takes one
    scale and shift, SDXL's per-channel latents_mean/latents_std. Per channel matters for SDXL: its noise
    schedule leaves 9 % of the image in the first step's input, so a black background far from the mean of the
    latents would never be drawn. Untrained (stats None): the real models' factors."""
    if stats is None:
        return dict(scaling_factor=0.3611, shift_factor=0.1159) if family == "flux" else \
            dict(scaling_factor=0.13025, shift_factor=None)
    if family == "flux":
        return dict(scaling_factor=1 / stats["std"], shift_factor=stats["mean"])
    return dict(scaling_factor=1.0, shift_factor=None, latents_mean=stats["channel_mean"],
                latents_std=stats["channel_std"])


def vae(latent_channels: int, seed: int, family: str, trained: bool = True):
    """An 8x AutoencoderKL (four levels) with `latent_channels`, with the trained weights where they exist.
    One VAE serves both tiny models (the same 4-channel 8x latent); its factors follow each family's pipeline
    (`factors`)."""
    from diffusers import AutoencoderKL

    model = _seeded(seed, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=VAE_CHANNELS, layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=VAE_GROUPS, sample_size=256,
        **factors(latent_stats() if trained else None, family)))
    state = trained_weights("vae-tiny") if trained else None
    if state is not None:
        model.load_state_dict(state)
    return model
