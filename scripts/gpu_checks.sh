#!/usr/bin/env bash
# The checks CPU machines cannot run: the Triton kernel on CUDA against the reference, and engines built
# with the toma::ToMASelect TensorRT plugin run against ONNX Runtime. Needs a CUDA GPU, and TensorRT 10.7+
# with Python bindings for the plugin checks (they skip, saying so, where it is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
make venv
unset TRITON_INTERPRET
export TOMA_GPU_CHECKS=1
.venv/bin/python -m pytest -v -rs tests/test_gpu.py "$@"
