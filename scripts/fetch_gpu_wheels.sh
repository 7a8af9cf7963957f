#!/usr/bin/env bash
# Fetch, on a machine with a package index, the wheels scripts/gpu_checks.sh installs on a GPU machine that
# has PyTorch, Triton, onnx, onnxruntime and transformers but no index: diffusers, polygraphy and tomesd at the
# versions constraints.txt pins, and diffusers' importlib_metadata. All pure Python (about 7 MB).
# Usage: scripts/fetch_gpu_wheels.sh [DIR] (default .whl, which git ignores); PYVER sets the target Python (3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
mkdir -p "$dir"
pins=$(grep -E '^(diffusers|polygraphy|tomesd)==' constraints.txt)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" -d "$dir" \
    $pins importlib_metadata==8.7.0 zipp==3.23.0
ls -la "$dir"
