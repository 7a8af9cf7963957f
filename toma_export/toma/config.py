"""ToMAConfig: every knob of the method in one frozen, validated object."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Union

from ..errors import UsageError

SUBLAYERS = ("attn", "cross_attn", "mlp")


@dataclass(frozen=True)
class ToMAConfig:
    """What to merge, how much, and when.

    ratio            share of image tokens merged away; each tile keeps d = n - floor(ratio * n) tokens.
    tile             tile shape (rows, cols) in tokens; must divide the token grid of every merged level.
                     4x4 is the official FLUX setting (16 tokens, 8 destinations at ratio 0.5).
    scale            softmax sharpness on cosine similarity (1000 = near-hard assignment, the official value).
    blocks           fnmatch patterns on block names (e.g. "single_transformer_blocks.*",
                     "down_blocks.2.*"); None = the model's default (see apply_toma).
    levels           UNet only, with blocks=None: how many transformer resolution levels to merge,
                     highest resolution first (1 = the 64x64 level of SDXL at 1024 px).
    sublayers        which sub-layers run on merged tokens: "attn" (self/joint attention), "cross_attn"
                     (UNet text cross-attention), "mlp" (UNet feed-forward, FLUX single-block MLP).
    merge_steps      denoising steps that merge: None = all, k = every k-th step (0, k, 2k, ...; the
                     official FLUX run uses 3), or an explicit collection of step indices.
    dst_every        recompute destinations on every dst_every-th merged step, reuse them in between.
    weights_every    recompute merge weights on every weights_every-th merged step (and whenever the
                     destinations are recomputed); in between the cached weights are reused.
    """

    ratio: float = 0.5
    tile: tuple[int, int] = (4, 4)
    scale: float = 1000.0
    blocks: Optional[tuple[str, ...]] = None
    levels: int = 1
    sublayers: tuple[str, ...] = SUBLAYERS
    merge_steps: Union[None, int, Iterable[int]] = None
    dst_every: int = 1
    weights_every: int = 1

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass normalisation
        if not isinstance(self.ratio, (int, float)) or not 0.0 <= self.ratio < 1.0:
            raise UsageError(f"ratio must be in [0, 1) (the share of tokens merged away), got {self.ratio!r}")
        tile = (self.tile, self.tile) if isinstance(self.tile, int) else tuple(self.tile)
        if len(tile) != 2 or not all(isinstance(v, int) and v >= 1 for v in tile):
            raise UsageError(f"tile must be two positive ints (rows, cols) in tokens, got {self.tile!r}")
        set_("tile", tile)
        if not self.scale > 0:
            raise UsageError(f"scale must be positive, got {self.scale!r}")
        if self.blocks is not None:
            blocks = (self.blocks,) if isinstance(self.blocks, str) else tuple(self.blocks)
            if not blocks:
                raise UsageError("blocks must name at least one pattern, or be None for the model default")
            set_("blocks", blocks)
        if not isinstance(self.levels, int) or self.levels < 1:
            raise UsageError(f"levels must be an int >= 1, got {self.levels!r}")
        sub = (self.sublayers,) if isinstance(self.sublayers, str) else tuple(self.sublayers)
        unknown = [s for s in sub if s not in SUBLAYERS]
        if unknown or not sub:
            raise UsageError(f"sublayers must be a non-empty subset of {SUBLAYERS}, got {self.sublayers!r}")
        set_("sublayers", tuple(s for s in SUBLAYERS if s in sub))
        steps = self.merge_steps
        if isinstance(steps, bool) or (isinstance(steps, int) and steps < 1):
            raise UsageError(f"merge_steps as an int is a period >= 1, got {steps!r}")
        if steps is not None and not isinstance(steps, int):
            steps = tuple(sorted(set(int(s) for s in steps)))
            if not steps or steps[0] < 0:
                raise UsageError(f"merge_steps must list non-negative step indices, got {self.merge_steps!r}")
            set_("merge_steps", steps)
        for name in ("dst_every", "weights_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"{name} must be an int >= 1, got {v!r}")

    def merges_at(self, step: int) -> bool:
        """Whether denoising step `step` (0-based) runs on merged tokens."""
        if self.merge_steps is None:
            return True
        if isinstance(self.merge_steps, int):
            return step % self.merge_steps == 0
        return step in self.merge_steps

    def refreshes_at(self, step: int) -> bool:
        """Whether merged step `step` selects destinations anew (else it reuses the last ones): the one
        refresh rule the patch, the served schedule and parity all follow."""
        return self.merged_index(step) % self.dst_every == 0

    def reweights_at(self, step: int) -> bool:
        """Whether merged step `step` recomputes merge weights (always when it refreshes destinations)."""
        return self.refreshes_at(step) or self.merged_index(step) % self.weights_every == 0

    def merged_index(self, step: int) -> int:
        """How many merged steps came before `step`: the clock of the dst/weights refresh periods."""
        if self.merge_steps is None:
            return step
        if isinstance(self.merge_steps, int):
            return -(-step // self.merge_steps)
        return sum(1 for s in self.merge_steps if s < step)
