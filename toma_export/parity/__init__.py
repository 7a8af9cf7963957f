"""Accuracy parity: PyTorch ToMA reference vs ONNX Runtime / TensorRT, per step and over a loop."""
from .validate import ValidateOptions, table, validate, write_report

__all__ = ["ValidateOptions", "validate", "table", "write_report"]
