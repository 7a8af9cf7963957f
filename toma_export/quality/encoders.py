"""CLIP-T and DINO for real models: the metrics the ToMA paper reports, from a CLIP and a DINOv2 model on disk.

Why: the shapes judge (judge.py) only reads the tiny models' shapes world; what merging costs FLUX.1 or SDXL
is measured the way the literature does, with
  - CLIP-T: 100 * max(cos(image embedding, text embedding), 0) per image and its prompt (`ClipScore`);
  - DINO: the cosine of DINOv2 CLS features against the unmerged image at the same seed (`DinoFeatures`, then
    `fidelity`, the same mean cosine as the judge's; `frechet` works on these features too).
Each model loads from a local folder or a hub id already in the Hugging Face cache, never from the network
(`local_files_only=True`); anything else is refused with one line that names the fix, before any weights load.
transformers (the `serve` extra) is imported only here, when a model is built.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import MissingComponent, UsageError
from ..errors import ModelNotAvailable
from .judge import fidelity, frechet

BATCH = 16                       # images (or image-prompt pairs) per forward pass
# the parts of a model folder, each as the file patterns of which one must be there (hub layouts, old and new)
WEIGHTS = ("weights", ("*.safetensors", "pytorch_model*.bin"))
IMAGE_PROCESSOR = ("image processor", ("preprocessor_config.json", "processor_config.json"))
TOKENIZER = ("tokenizer", ("tokenizer.json", "vocab.json"))


class ClipScore:
    """CLIP-T of image-prompt pairs with a transformers `CLIPModel` and the processor saved beside it."""

    def __init__(self, source: str, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 batch: int = BATCH):
        folder = resolve(source, "CLIP", "--clip", ("clip",), "openai/clip-vit-large-patch14",
                         (WEIGHTS, TOKENIZER, IMAGE_PROCESSOR))
        transformers = _transformers()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch = _batch(batch)
        processor = _load(transformers.AutoProcessor, folder, source, "--clip", "its processor")
        self.tokenizer = getattr(processor, "tokenizer", None)
        self.image_processor = getattr(processor, "image_processor", None)
        if self.tokenizer is None or self.image_processor is None:
            raise ModelNotAvailable(f"--clip {source}: its processor has no tokenizer or no image processor; copy "
                                    "the whole model folder from the hub")
        self.model = _load(transformers.CLIPModel, folder, source, "--clip", "its weights", dtype=dtype)
        self.model.to(self.device).eval()
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def score(self, images: list, prompts: list[str]) -> list[float]:
        """CLIP-T of each (image, prompt) pair: 100 * max(cos(image_embed, text_embed), 0), the projected
        embeddings of the vision and text towers (prompts past the text length are cut, as CLIP was trained)."""
        if len(images) != len(prompts):
            raise UsageError(f"CLIP-T scores image-prompt pairs: got {len(images)} images and {len(prompts)} prompts")
        scores = []
        for start in range(0, len(images), self.batch):
            pixels = self._pixels(images[start:start + self.batch])
            text = self.tokenizer(list(prompts[start:start + self.batch]), padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt").to(self.device)
            image_embeds = _pooled(self.model.get_image_features(pixel_values=pixels))
            text_embeds = _pooled(self.model.get_text_features(**text))
            cos = F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=1)
            scores += (100 * cos.clamp(min=0)).tolist()
        return scores

    def _pixels(self, images) -> torch.Tensor:
        values = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return values["pixel_values"].to(self.device, self.model.dtype)


class DinoFeatures:
    """DINOv2 image features (a transformers `Dinov2Model` and its image processor), for DINO fidelity."""

    def __init__(self, source: str, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 batch: int = BATCH):
        folder = resolve(source, "DINOv2", "--dino", ("dinov2",), "facebook/dinov2-base", (WEIGHTS, IMAGE_PROCESSOR))
        transformers = _transformers()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch = _batch(batch)
        self.image_processor = _load(transformers.AutoImageProcessor, folder, source, "--dino", "its image processor")
        self.model = _load(transformers.Dinov2Model, folder, source, "--dino", "its weights", dtype=dtype)
        self.model.to(self.device).eval()

    @torch.no_grad()
    def features(self, images: list) -> torch.Tensor:
        """(B, hidden) float32 on the CPU: the CLS token of the last hidden state (after DINOv2's final layer
        norm, its `pooler_output`), the image descriptor DINO similarity is computed on."""
        out = []
        for start in range(0, len(images), self.batch):
            values = self.image_processor(images=[im.convert("RGB") for im in images[start:start + self.batch]],
                                          return_tensors="pt")
            hidden = self.model(pixel_values=values["pixel_values"].to(self.device, self.model.dtype))
            out.append(hidden.last_hidden_state[:, 0].float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.model.config.hidden_size)


def resolve(source: str, label: str, option: str, model_types: tuple[str, ...], example: str,
            parts: tuple = (WEIGHTS,)) -> Path:
    """The folder of a model given as a local folder or a cached hub id, checked to hold a transformers model of
    one of `model_types` and each of `parts` ((name, file patterns)); one line naming the fix otherwise. The model
    type is read off config.json because transformers loads another architecture's folder with a warning and
    random weights, and the parts are checked here because its own errors on a missing file point at the hub."""
    from ..models import _hub_cache, _hub_snapshot

    path = Path(source).expanduser()
    if path.is_dir():
        folder = path
    elif path.exists():
        raise UsageError(f"{option} {source} is a file; pass the {label} model folder that holds it (the one with "
                         "config.json) or its hub id")
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")):
        folder = _hub_snapshot(source)
        if folder is None:
            raise ModelNotAvailable(f"{option} {source}: not a folder, and not in the local Hugging Face cache "
                                    f"({_hub_cache()}); download it where the hub is reachable (`huggingface-cli "
                                    f"download {source}`) or pass its folder")
    else:
        raise UsageError(f"{option} {source}: no such folder, nor a hub id (org/name); pass a {label} model folder "
                         f"or a hub id in the local Hugging Face cache, e.g. {example}")
    config = folder / "config.json"
    if not config.is_file():
        raise UsageError(f"{option} {source}: no config.json in {folder}; pass a transformers {label} model folder "
                         f"(config.json and weights, as `save_pretrained` writes it), e.g. {example}")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        raise UsageError(f"{option} {source}: {config} is not a readable model config; download the model "
                         "folder again") from None
    if model_type not in model_types:
        what = f"a {model_type!r} model" if model_type else "not a transformers model (no model_type)"
        raise UsageError(f"{option} {source}: its config.json is {what}, not {label} "
                         f"(model_type {' or '.join(map(repr, model_types))}); pass a {label} model, e.g. {example}")
    for name, patterns in parts:
        if not any(any(folder.glob(p)) for p in patterns):
            raise ModelNotAvailable(f"{option} {source}: config.json but no {name} ({' or '.join(patterns)}) in "
                                    f"{folder}; copy the {name} files beside it, or download the whole model folder")
    return folder


def _load(cls, folder: Path, source: str, option: str, what: str, **kwargs):
    """`cls.from_pretrained(folder)` offline; a part that is there but unreadable is one line naming it."""
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().split("\n")[0].split(". ")[0][:160] or type(err).__name__
        raise ModelNotAvailable(f"{option} {source}: could not load {what} from {folder} ({first}); download the "
                                "whole model folder again") from None


def _pooled(out) -> torch.Tensor:
    """The projected embeddings of `get_image_features` / `get_text_features`: a tensor before transformers 5,
    an output whose `pooler_output` holds them from 5 on."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _batch(batch: int) -> int:
    if int(batch) < 1:
        raise UsageError(f"encoder batch must be at least 1, got {batch}")
    return int(batch)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MissingComponent("CLIP-T and DINO need transformers: pip install 'toma-export[serve]'") from None
    return transformers


__all__ = ["ClipScore", "DinoFeatures", "resolve", "fidelity", "frechet"]
