"""Accuracy parity: PyTorch ToMA reference vs ONNX Runtime / TensorRT, per step and over a loop.

validate.py orchestrates; record.py is what the reference computes (and its file form); compare.py judges
the candidates against it; report.py prints and writes the verdict."""
from .report import table, write_report
from .validate import ValidateOptions, validate

__all__ = ["ValidateOptions", "validate", "table", "write_report"]
