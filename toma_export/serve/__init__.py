"""Serving: exported ToMA graphs (ONNX Runtime) and engines (TensorRT) as drop-in networks for diffusers
pipelines, the pipelines themselves, and model repositories.

Names resolve lazily, so `toma-export --help` does not import diffusers, onnxruntime or TensorRT.

    from toma_export.serve import load_network, load_pipeline
    pipe = load_pipeline("flux-tiny", network=False)
    pipe.transformer = load_network("out/flux-tiny-<key>/model.onnx")
"""
from __future__ import annotations

import importlib

_NAMES = {"load_network": "network", "ServedNetwork": "network",
          "DestinationSchedule": "schedule", "load_pipeline": "pipeline", "attach": "pipeline",
          "serving_artifacts": "pipeline", "best_backend": "pipeline"}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
