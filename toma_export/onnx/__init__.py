"""ONNX export: ToMAGraph (the graph's I/O contract), the ToMASelect function body, and `export`."""
from .export import ExportOptions, export
from .graph import RECOMPUTE, ToMAGraph, dst_input, dst_output

__all__ = ["ExportOptions", "export", "ToMAGraph", "RECOMPUTE", "dst_input", "dst_output"]
