"""Accuracy parity: PyTorch ToMA reference vs ONNX Runtime / TensorRT, per step and over a loop."""
from .validate import ValidateOptions, table, validate

__all__ = ["ValidateOptions", "validate", "table"]
