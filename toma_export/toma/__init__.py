"""PyTorch reference of ToMA: selection, tiles, merge/unmerge, schedule, diffusers patching."""
from .config import ToMAConfig
from .merge import TileMerge
from .patch import PatchReport, apply_toma, remove_toma, reset_toma, toma_state
from .selection import facility_location
from .tiles import fold, unfold

__all__ = ["ToMAConfig", "TileMerge", "PatchReport", "apply_toma", "remove_toma", "reset_toma", "toma_state",
           "facility_location", "fold", "unfold"]
