"""toma-export: ToMA token merging for diffusers FLUX.1 and SDXL, exportable to ONNX and TensorRT."""
from . import models
from .toma import (
    PatchReport,
    TileMerge,
    ToMAConfig,
    apply_toma,
    facility_location,
    remove_toma,
    reset_toma,
    toma_state,
)

__version__ = "0.1.0"
__all__ = ["models", "ToMAConfig", "TileMerge", "PatchReport", "apply_toma", "remove_toma", "reset_toma",
           "toma_state", "facility_location", "__version__"]
