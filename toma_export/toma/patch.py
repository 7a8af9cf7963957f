"""apply_toma / remove_toma: class-swap the chosen blocks (as tomesd does) and hook the network's forward.

Nothing is wrapped or copied: each patched block gets a generated subclass whose forward merges, and
remove_toma restores the original class, so the unpatched model is bit-identical to one never patched.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import UsageError
from .config import ToMAConfig
from .state import ToMAState

log = logging.getLogger("toma_export")
_FAMILIES: dict = {}          # name -> patch hooks (supports, candidates, check_block, install_hooks)
_SWAPPED: dict = {}


def register_family(name: str, hooks) -> None:
    """Make a model family patchable: `hooks` answers supports(model), candidates(model, config),
    check_block(name, block, config) and install_hooks(model, state, groups). toma_export.families
    registers each family once, when the package is imported."""
    _FAMILIES[name] = hooks


def families() -> dict:
    """The registered families' patch hooks, by name."""
    return dict(_FAMILIES)


class Candidate(NamedTuple):
    """A block ToMA can patch, as the family modules list them."""

    name: str
    block: torch.nn.Module
    group: str
    mixin: type
    default: bool
    downsample: int   # the group's token grid is the network's spatial input divided by this


@dataclass
class PatchReport:
    """What apply_toma did: the model family, the patched blocks by group, and the config."""

    family: str
    blocks: list[str]
    groups: dict[str, list[str]]
    total: int
    config: ToMAConfig
    downsample: dict[str, int]

    def __str__(self) -> str:
        c = self.config
        lines = [f"ToMA patched {len(self.blocks)} of {self.total} {self.family} blocks in {len(self.groups)} "
                 f"group(s): ratio {c.ratio}, tile {c.tile[0]}x{c.tile[1]}, scale {c.scale:g}, "
                 f"sublayers {'+'.join(c.sublayers)}"]
        for group, names in self.groups.items():
            lines.append(f"  {group}: {_ranges(names)}")
        return "\n".join(lines)


def _ranges(names: list[str]) -> str:
    """'a.5', 'a.6', 'a.7' -> 'a.5-7'; keeps the summary one line per group."""
    prefix, _, _ = names[0].rpartition(".")
    idx = [n.rpartition(".")[2] for n in names]
    if all(n.rpartition(".")[0] == prefix for n in names) and all(i.isdigit() for i in idx):
        nums = [int(i) for i in idx]
        if nums == list(range(nums[0], nums[-1] + 1)):
            return f"{prefix}.{nums[0]}" + (f"-{nums[-1]}" if len(nums) > 1 else "")
    return ", ".join(names)


def network_of(target) -> torch.nn.Module:
    """The FLUX transformer or SDXL UNet inside a pipeline, or the module itself."""
    if any(module.supports(target) for module in _FAMILIES.values()):
        return target
    for attr in ("transformer", "unet"):
        inner = getattr(target, attr, None)
        if inner is not None and any(m.supports(inner) for m in _FAMILIES.values()):
            return inner
    raise TypeError(f"ToMA cannot patch a {type(target).__name__}: pass a diffusers FluxTransformer2DModel, "
                    "UNet2DConditionModel, or a pipeline holding one as .transformer or .unet")


def apply_toma(target, config: ToMAConfig | None = None) -> PatchReport:
    """Patch a FLUX transformer / SDXL UNet (or the pipeline holding it) with ToMA; re-applying reconfigures.

    Default blocks: FLUX merges all but the first 5/19 of the double-stream and 5/38 of the single-stream
    blocks (the official split, scaled to the model's depth); SDXL merges the transformer blocks of the
    highest-resolution transformer level (`config.levels` to widen). Raises instead of patching nothing.
    """
    config = config or ToMAConfig()
    model = network_of(target)
    remove_toma(model)
    family_name, family = next((n, m) for n, m in _FAMILIES.items() if m.supports(model))
    found = [Candidate(*c) for c in family.candidates(model, config)]
    if config.blocks is None:
        chosen = [c for c in found if c.default]
    else:
        chosen = [c for c in found if any(fnmatch.fnmatchcase(c.name, p) for p in config.blocks)]
        if not chosen:
            names = ", ".join(c.name for c in found[:3])
            raise UsageError(f"ToMA: blocks={list(config.blocks)} match none of the {len(found)} {family_name} "
                             f"blocks (names look like {names}, ...)")
    chosen = [c for c in chosen if set(c.mixin._toma_sublayers) & set(config.sublayers)]
    if not chosen:
        raise UsageError(f"ToMA: nothing to patch in this {family_name} model with sublayers={config.sublayers}")
    for c in chosen:
        family.check_block(c.name, c.block, config)

    state = ToMAState(config)
    groups: dict[str, list[str]] = {}
    for c in chosen:
        original = type(c.block)
        c.block.__class__ = _swapped(c.mixin, original)
        c.block._toma, c.block._toma_group, c.block._toma_original = state, c.group, original
        groups.setdefault(c.group, []).append(c.name)
    model._toma = state
    model._toma_hooks = family.install_hooks(model, state, list(groups))
    downsample = {c.group: c.downsample for c in chosen}
    report = PatchReport(family_name, [c.name for c in chosen], groups, len(found), config, downsample)
    model._toma_report = report
    log.info("%s", report)
    return report


def _swapped(mixin, original):
    key = (mixin, original)
    if key not in _SWAPPED:
        _SWAPPED[key] = type(f"ToMA{original.__name__}", (mixin, original), {})
    return _SWAPPED[key]


def remove_toma(target) -> bool:
    """Restore every patched block's class and drop the hooks; returns whether anything was patched."""
    model = network_of(target)
    if getattr(model, "_toma", None) is None:
        return False
    for module in model.modules():
        original = module.__dict__.get("_toma_original")
        if original is not None:
            module.__class__ = original
            del module._toma, module._toma_group, module._toma_original
    for handle in model._toma_hooks:
        handle.remove()
    del model._toma, model._toma_hooks, model._toma_report
    return True


def toma_state(target) -> ToMAState:
    """The patched model's state (step clock, cache, counters)."""
    model = network_of(target)
    state = getattr(model, "_toma", None)
    if state is None:
        raise RuntimeError("ToMA is not applied to this model; call apply_toma first")
    return state


def reset_toma(target) -> None:
    """Start the next call at step 0 with nothing cached (new generations are also detected by timestep)."""
    toma_state(target).reset()
