"""Runtimes as loaders and runners, shared by validation, serving and benchmarks (as polygraphy's
backend/<framework>/{loader,runner}): ONNX Runtime sessions from a file (providers, threads, lean options,
weight sharing, IOBinding buffers) and TensorRT engines on CUDA (version checks, shapes, persistent
buffers, CUDA graphs). Nothing else opens a session or deserializes an engine."""
