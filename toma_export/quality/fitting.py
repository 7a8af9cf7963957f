"""What training any network of the shapes world needs, the tiny models (train.py) and the judge (judge.py)
alike: drawn batches, progress bars and the optimiser step. Its own module so that neither trainer imports
the other."""
from __future__ import annotations

import torch

from .. import shapes

BAR_ROW = 0              # the terminal row of this process's bars: each network's own when both train at once


def progress_bar(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, dynamic_ncols=True, leave=True, position=BAR_ROW)


def images(seed: int, count: int, size: int, quiet: bool = False):
    """(count, 3, size, size) in [-1, 1], captions, labels: drawn in chunks under a progress bar."""
    chunks, captions, labels = [], [], []
    with progress_bar(count, f"drawing {count} shapes", quiet) as bar:
        for start in range(0, count, 500):
            x, c, y = shapes.batch(seed, start, min(500, count - start), size)
            chunks.append(x), captions.extend(c), labels.append(y)
            bar.update(len(c))
    return torch.cat(chunks), captions, torch.cat(labels)


def update(opt, sched, loss, bar, step: int, clip: float | None = None) -> None:
    """One optimiser step (gradients clipped to `clip` if given), the loss shown every 20 steps."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], clip)
    opt.step(), sched.step()
    if step % 20 == 0:
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.update()
