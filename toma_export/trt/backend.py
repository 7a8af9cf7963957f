"""Which TensorRT is installed: full TensorRT (GPU builds, runs the plugin) or TensorRT-RTX (ahead-of-time
builds for RTX cards, even on a machine without a GPU; no plugins, so the selection body is inlined)."""
from __future__ import annotations

import importlib

from ..errors import MissingComponent, UsageError

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL = ("install TensorRT (on a GPU machine: `pip install tensorrt`, or the TensorRT SDK's Python wheel) "
           "or TensorRT-RTX (`pip install tensorrt-rtx-cu13`, builds RTX engines ahead of time, no GPU needed)")


class BackendMissing(MissingComponent):
    """The requested TensorRT flavour cannot be imported."""


def load(name: str | None = None):
    """(name, module) for `name`, or for the first of tensorrt / tensorrt-rtx that imports."""
    if name is not None and name not in MODULES:
        raise UsageError(f"backend must be one of {', '.join(MODULES)}, got {name!r}")
    errors = []
    for candidate in [name] if name else list(MODULES):
        try:
            module = importlib.import_module(MODULES[candidate])
            getattr(module, "Builder")  # the bare `tensorrt` stub wheel imports but has no bindings
            return candidate, module
        except (ImportError, AttributeError, OSError) as err:
            errors.append(f"{candidate}: {err}")
    what = f"backend {name!r} is not usable" if name else "no TensorRT backend found"
    raise BackendMissing(f"{what} ({'; '.join(errors)}); {INSTALL}")


def version(module) -> str:
    return getattr(module, "__version__", "unknown")
