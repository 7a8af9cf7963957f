"""ONNX export: ToMAGraph (the graph's I/O contract), the ToMASelect function body, `export`, and
`export_in_child` for callers that go on to other heavy work."""
from .child import export_in_child
from .export import ExportOptions, export
from .graph import RECOMPUTE, ToMAGraph, dst_input, dst_output

__all__ = ["ExportOptions", "export", "export_in_child", "ToMAGraph", "RECOMPUTE", "dst_input", "dst_output"]
