"""First-Block Cache: skip the network's tail on steps where its first block's output barely changed.

Why here: ToMA cuts the tokens of every step; step caching skips most of the network on some steps. The two work on
different axes, so they combine. diffusers' own hook (`diffusers.hooks.apply_first_block_cache`) is the reference:
the PyTorch runs use it as it is, and the loops that run an exported head and tail (serve/network.py) apply the same
rule through `FirstBlockCache`:

- r = the first block's image output minus its input (the head residual);
- the tail runs when mean|r - r_prev| / mean|r_prev| > threshold, r_prev being the residual of the last step that
  ran the tail (a cached step does not replace it); the first call of a generation always runs it;
- a cached step's image hidden states are the head's output plus the tail residual (the last block's image output
  minus the head's) of the last computed step; the output layers then run as always.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import UsageError

HEAD_HOOK = "fbc_leader_block_hook"     # the name diffusers registers its first-block hook under


@dataclass(frozen=True)
class CacheConfig:
    """`fbcache:THRESHOLD`: the relative change of the head residual below which a step reuses the tail."""

    threshold: float

    def __post_init__(self):
        if not isinstance(self.threshold, (int, float)) or not 0 < self.threshold < 1:
            raise UsageError(f"the fbcache threshold must lie in (0, 1) (0.05-0.2 are usual), got {self.threshold!r}")

    def __str__(self) -> str:
        return f"fbcache:{self.threshold:g}"


def parse(text: str | None) -> CacheConfig | None:
    """'none' (or None) -> None; 'fbcache:0.1' -> CacheConfig(0.1); anything else one UsageError."""
    if text is None or text.strip().lower() == "none":
        return None
    kind, _, value = text.strip().partition(":")
    if kind.lower() != "fbcache" or not value:
        raise UsageError(f"--cache must be none or fbcache:THRESHOLD (e.g. fbcache:0.1), got {text!r}")
    try:
        threshold = float(value)
    except ValueError:
        raise UsageError(f"--cache fbcache:THRESHOLD takes a number in (0, 1), got {value!r}") from None
    return CacheConfig(threshold)


def label(cache: CacheConfig | None) -> str:
    return "none" if cache is None else str(cache)


def check_family(cache: CacheConfig | None, spec) -> None:
    """Refuse a cache on a network that has no first block to compare."""
    if cache is not None:
        check_split(spec)


def check_split(spec, part: str | None = None) -> None:
    """Refuse a network the cache cannot split (SDXL's UNet), or a part it does not have."""
    parts = spec.parts
    if not parts:
        raise UsageError(f"{spec.name}: First-Block Cache needs a stack of transformer blocks (FLUX); the SDXL UNet is "
                         "not one (its blocks change resolution), so pass --cache none")
    if part is not None and part not in parts:
        raise UsageError(f"{spec.name} splits into {' and '.join(parts)} for First-Block Cache, not {part!r}")


def relative_change(residual: torch.Tensor, previous: torch.Tensor) -> float:
    """mean|r - r_prev| / mean|r_prev|, the quantity diffusers compares with the threshold (here in fp32, so that a
    half-precision graph's means do not round)."""
    residual, previous = residual.float(), previous.float()
    return float((residual - previous).abs().mean() / previous.abs().mean())


@dataclass
class _CallCache:
    head_residual: torch.Tensor | None = None
    tail_residual: torch.Tensor | None = None


@dataclass
class FirstBlockCache:
    """The cache of a loop that runs an exported head and tail: per call index of a step (true CFG runs two calls,
    which diffusers keeps in separate cache contexts) the last computed head residual and tail residual, and every
    decision made since the last reset."""

    config: CacheConfig
    calls: dict = field(default_factory=dict)
    decisions: list = field(default_factory=list)     # (step, call, computed, relative change or None)

    def reset(self) -> None:
        self.calls.clear()
        self.decisions.clear()

    def decide(self, step: int, call: int, head_residual: torch.Tensor) -> bool:
        """Whether this call runs the tail; a computed call keeps its head residual as the next reference."""
        cached = self.calls.setdefault(call, _CallCache())
        if cached.head_residual is None or cached.tail_residual is None \
                or cached.head_residual.shape != head_residual.shape:
            change, compute = None, True
        else:
            change = relative_change(head_residual, cached.head_residual)
            compute = change > self.config.threshold
        if compute:
            cached.head_residual = head_residual.clone()
        self.decisions.append((step, call, compute, change))
        return compute

    def store(self, call: int, tail_residual: torch.Tensor) -> None:
        self.calls[call].tail_residual = tail_residual.clone()

    def tail_residual(self, call: int) -> torch.Tensor | None:
        """The last computed tail residual of this call index (None before the first)."""
        cached = self.calls.get(call)
        return None if cached is None else cached.tail_residual

    @property
    def computed(self) -> int:
        return sum(d[2] for d in self.decisions)

    @property
    def cached(self) -> int:
        return len(self.decisions) - self.computed


class TorchCache:
    """diffusers' First-Block Cache on a PyTorch FLUX transformer, its decisions recorded. Enable it after ToMA
    (the hooks wrap the blocks' forward as they are then) and disable it before ToMA changes."""

    def __init__(self, network, config: CacheConfig):
        from diffusers.hooks import FirstBlockCacheConfig

        self.network, self.config = network, config
        self.decisions: list[bool] = []
        _register_swapped_blocks(network)
        network.enable_cache(FirstBlockCacheConfig(threshold=config.threshold))
        head = network.transformer_blocks[0]._diffusers_hook.get_hook(HEAD_HOOK)
        decide = head._should_compute_remaining_blocks

        def recorded(residual):
            compute = decide(residual)
            self.decisions.append(compute)
            return compute

        head._should_compute_remaining_blocks = recorded

    def reset(self) -> None:
        self.network._reset_stateful_cache()
        self.decisions.clear()

    def disable(self) -> None:
        """Remove the hooks. diffusers restores each block's forward as a bound method stored on the instance, which
        would hide a later ToMA class swap; those are dropped, so forward is looked up on the class again."""
        self.network.disable_cache()
        for module in self.network.modules():
            bound = module.__dict__.get("forward")
            if getattr(bound, "__self__", None) is module:
                del module.__dict__["forward"]

    @property
    def computed(self) -> int:
        return sum(self.decisions)

    @property
    def cached(self) -> int:
        return len(self.decisions) - self.computed


def _register_swapped_blocks(network) -> None:
    """diffusers' hooks look blocks up by their exact class; a ToMA-patched block's class is a generated subclass,
    which gets its original's entry (same forward signature and outputs)."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    for block in network.modules():
        original = getattr(block, "_toma_original", None)
        if original is not None:
            TransformerBlockRegistry.register(type(block), TransformerBlockRegistry.get(original))
