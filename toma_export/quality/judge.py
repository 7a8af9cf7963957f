"""The shapes judge: a small classifier of shape, colour and background, and the quality metrics built on it.

Why: the trained tiny models draw the shapes world, so what ToMA costs in quality can be measured there the way
the ToMA paper measures real models, with stand-ins named as such in every output:
  - prompt accuracy (the stand-in for CLIP-T): the share of images whose three predicted attributes match
    their caption;
  - judge fidelity (the stand-in for DINO similarity): the cosine of the judge's penultimate features against
    the unmerged image at the same seed;
  - judge Fréchet distance (the stand-in for FID): on those features, between two sets of images.
The judge sees every image at 64x64, so it checks any size a tiny model draws.
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
