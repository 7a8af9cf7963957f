"""The shapes judge: a small classifier of shape, colour and background, and the quality metrics built on it.

Why: the trained tiny models draw the shapes world, so what ToMA costs in quality can be measured there the way
the ToMA paper measures real models, with stand-ins named as such in every output:
  - prompt accuracy (the stand-in for CLIP-T): the share of images whose three predicted attributes match
    their caption;
  - judge fidelity (the stand-in for DINO similarity): the cosine of the judge's penultimate features against
    the unmerged image at the same seed;
  - judge Fréchet distance (the stand-in for FID): on those features, between two sets of images.
The judge sees every image at 64x64, so it checks any size a tiny model draws.
The control measure needs no training: where a ControlNet drew the shape against the mask of the control it was
given (the IoU of the two regions and the distance of their centroids).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import shapes

INPUT = 64                       # the side the judge looks at
FEATURES = 32                    # penultimate width: the fidelity and Fréchet features
HEADS = {"colour": list(shapes.COLOURS), "shape": list(shapes.SHAPES), "background": list(shapes.BACKGROUNDS)}
WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "weights" / "judge.safetensors"
HELD_OUT_SEED = 20261205          # the fixed held-out set: no training run draws from this seed
CONTROL_SEED = 20261207           # the samples whose outlines control figures are drawn for (held out too)


class Judge(nn.Module):
    def __init__(self):
        super().__init__()
        layers, width = [nn.Conv2d(3, 24, 3, padding=1), nn.SiLU()], 24
        for out in (32, 48, 64, 64):          # 64 -> 4 pixels; corners and edges survive as channels
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            width = out
        self.conv = nn.Sequential(*layers)
        self.project = nn.Sequential(nn.Linear(2 * width, FEATURES), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(FEATURES, len(v)) for k, v in HEADS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, FEATURES)."""
        if x.shape[-2:] != (INPUT, INPUT):
            x = F.interpolate(x, size=(INPUT, INPUT), mode="area")
        x = self.conv(x)
        return self.project(torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1))     # where and whether a corner is

    def forward(self, x: torch.Tensor) -> dict:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> list[tuple[str, str, str]]:
        """(colour, shape, background) per image, the order shapes.parse gives."""
        out = {k: v.argmax(1).tolist() for k, v in self(x).items()}
        return [tuple(HEADS[k][out[k][i]] for k in HEADS) for i in range(len(x))]


def pixels(images) -> torch.Tensor:
    """PIL images (or a tensor already in [-1, 1]) -> (B, 3, H, W) in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        return images
    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arrays / 127.5 - 1).permute(0, 3, 1, 2).contiguous()


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, noise and a colour cast, so generated images (softer, noisier) read like drawn ones."""
    b = len(x)
    blur = torch.rand(b, generator=g) < 0.5
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
        x = torch.where(blur.view(-1, 1, 1, 1), F.conv2d(F.pad(x, (1,) * 4, mode="replicate"), k, groups=3), x)
    x = x + 0.15 * torch.rand(b, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    x = x + 0.1 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5)
    return x.clamp(-1, 1)


@torch.enable_grad()
def train(seed: int, count: int = 16000, steps: int = 2500, batch: int = 64, quiet: bool = False) -> Judge:
    from .fitting import images, progress_bar, update

    x, _, y = images(seed, min(count, steps * batch), INPUT, quiet)      # no more than the steps can see
    torch.manual_seed(seed)
    judge = Judge().train()
    opt = torch.optim.AdamW(judge.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    with progress_bar(steps, "judge", quiet) as bar:
        for i in range(steps):
            pick = torch.randint(0, len(x), (batch,), generator=g)
            logits = judge(_augment(x[pick], g))
            loss = sum(F.cross_entropy(logits[k], y[pick, j]) for j, k in enumerate(HEADS))
            update(opt, sched, loss, bar, i)
    return judge.eval()


def held_out_accuracy(judge: Judge, count: int = 1200, size: int = INPUT) -> dict:
    """Accuracy per head and on all three at once, on the fixed held-out set (seed HELD_OUT_SEED)."""
    x, _, y = shapes.batch(HELD_OUT_SEED, 0, count, size)
    with torch.no_grad():
        logits = judge(x)
    pred = {k: logits[k].argmax(1) for k in HEADS}
    right = torch.stack([pred[k] == y[:, j] for j, k in enumerate(HEADS)], 1)
    return {**{k: float(right[:, j].float().mean()) for j, k in enumerate(HEADS)},
            "all": float(right.all(1).float().mean()), "images": count}


def load(path: Path = WEIGHTS) -> Judge:
    """The judge of a weights file: the package's, or one `make train-tiny` just wrote."""
    from safetensors.torch import load_file

    judge = Judge()
    judge.load_state_dict(load_file(str(path)))
    return judge.eval()


def scores(judge: Judge, images, captions: list[str]) -> dict:
    """{"accuracy": share of images whose predicted (colour, shape, background) all match their caption,
    "attributes": {colour, shape, background: share right}}, from one pass of the judge."""
    predicted = judge.predict(pixels(images))
    right = np.array([[p == w for p, w in zip(found, shapes.parse(c))] for found, c in zip(predicted, captions)])
    return dict(accuracy=float(right.all(1).mean()),
                attributes={k: float(right[:, i].mean()) for i, k in enumerate(HEADS)})


def prompt_accuracy(judge: Judge, images, captions: list[str]) -> float:
    return scores(judge, images, captions)["accuracy"]


def attribute_accuracy(judge: Judge, images, captions: list[str]) -> dict:
    """Which part of a caption a change loses."""
    return scores(judge, images, captions)["attributes"]


def features(judge: Judge, images) -> torch.Tensor:
    with torch.no_grad():
        return judge.features(pixels(images))


def fidelity(feats: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine between each image's features and its reference's (the same seed and caption, unmerged)."""
    return float(F.cosine_similarity(feats, reference, dim=1).mean())


def frechet(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Fréchet distance between two feature sets (Gaussian fits); None where either set has fewer images
    than features plus one, too few for a full-rank covariance."""
    if min(len(a), len(b)) <= a.shape[1]:
        return None
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    return max(0.0, float(distance))              # rounding can leave -0.0 for identical sets


# Half the smallest gap between a shape colour and a background, in the channel where they differ most (green on
# black, 170 apart): the least a pixel must differ from the background to count as shape, so that a half-covered
# edge of any colour can and noise or a faint smudge cannot.
CLEAR = min(np.abs(np.subtract(c, b)).max() for c in shapes.COLOURS.values() for b in shapes.BACKGROUNDS.values()) / 2


def _rgb(image) -> np.ndarray:
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"an image must be a PIL image or a (height, width, 3) uint8 array, got {array.dtype} "
                         f"{array.shape}")
    return array


def segment(image, caption: str | None = None) -> np.ndarray:
    """The drawn shape of an image of the shapes world, (height, width) bool. The background is the caption's,
    else whichever of black and white the corners are nearer (their median, so a shape over one corner does not
    tip it). The shape's pixels are those at least half way from the background to the shape's typical colour
    (the median of the pixels past CLEAR): the rule the mask follows (pixels at least half covered), so an
    anti-aliased edge counts alike in both, whatever the colour; never nearer the background than CLEAR, so
    noise and faint smudges are not shape."""
    pixels = _rgb(image).astype(np.int16)
    if caption is not None:
        background = np.array(shapes.BACKGROUNDS[shapes.parse(caption)[2]])
    else:
        corners = np.median(pixels[[0, 0, -1, -1], [0, -1, 0, -1]], 0)
        background = min((np.array(c) for c in shapes.BACKGROUNDS.values()), key=lambda c: np.abs(corners - c).sum())
    away = np.abs(pixels - background).max(2)
    clear = away > CLEAR
    if not clear.any():
        return clear
    return away >= max(CLEAR, np.median(away[clear]) / 2 - 0.5)     # - 0.5: a half-covered pixel may round down


def control_scores(image, mask, caption: str | None = None) -> dict:
    """{"iou": IoU of the drawn shape (`segment`) with the control's mask, "centroid": distance between their
    centroids as a share of the image side (per axis, for non-square images), None where no shape was drawn}."""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ or mask.ndim != 2:
        raise ValueError(f"the mask must be a 2-D bool array, got {mask.dtype} {mask.shape}")
    if not mask.any():
        raise ValueError("the mask covers no pixel: there is nothing to compare the drawn shape with")
    drawn = segment(image, caption)
    if drawn.shape != mask.shape:
        raise ValueError(f"the image is {drawn.shape[1]}x{drawn.shape[0]} but its mask {mask.shape[1]}x{mask.shape[0]}")
    iou = float((drawn & mask).sum() / (drawn | mask).sum())
    if not drawn.any():
        return {"iou": iou, "centroid": None}
    side = np.array(mask.shape, dtype=float)
    offset = (np.argwhere(drawn).mean(0) - np.argwhere(mask).mean(0)) / side
    return {"iou": iou, "centroid": float(np.hypot(*offset))}


def mean_control_scores(images, masks, captions: list[str] | None = None) -> dict:
    """`control_scores` over a set of images: {"iou": mean over all, "centroid": mean over the images with a
    shape (None if none has one), "images": how many, "missing": how many show no shape}."""
    images, masks = list(images), list(masks)
    captions = [None] * len(images) if captions is None else list(captions)
    if not images or not len(images) == len(masks) == len(captions):
        raise ValueError(f"control scores need as many masks and captions as images (at least one), got "
                         f"{len(images)} images, {len(masks)} masks, {len(captions)} captions")
    found = [control_scores(im, m, c) for im, m, c in zip(images, masks, captions)]
    centroids = [f["centroid"] for f in found if f["centroid"] is not None]
    return {"iou": float(np.mean([f["iou"] for f in found])),
            "centroid": float(np.mean(centroids)) if centroids else None,
            "images": len(found), "missing": len(found) - len(centroids)}
