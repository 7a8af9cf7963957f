"""GPU implementations of the `toma::ToMASelect` op: the Triton kernel and its TensorRT plugin.

Installed as `toma_export.plugins` (pyproject maps this folder), imported only when asked for.
"""
