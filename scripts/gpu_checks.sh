#!/usr/bin/env bash
# The checks a CPU machine cannot run, in one command: the Triton selection kernel on CUDA against the
# reference, the PyTorch ToMA patch on CUDA in fp16/bf16 against fp32, the benchmark's GPU mode, and, where
# full TensorRT 10.9+ imports, engines built with the toma::ToMASelect plugin (and with the inlined body) run
# against ONNX Runtime, an image generated through one, and `build --weightless` plans (refit and identical)
# refitted at load and compared with the normal engine, per call and through generate (their sizes in the
# summary), the First-Block Cache pair of engines (build --cache) served against the ONNX Runtime pair, and the
# 8-bit engines (INT8, and FP8 from sm89) against the fp16 engine with and without ToMA (time per step, image
# similarity; needs nvidia-modelopt, carried as a wheel), and the ControlNet engines (build --controlnet, the
# plugin in the ControlNet and in the network taking its residuals) against ONNX Runtime, per graph.
# Checks that cannot run skip with their reason.
# Writes one JSON summary: $TOMA_GPU_SUMMARY, default gpu-checks.json.
#
# Where `make venv` made .venv (a machine with a package index) it runs there. Otherwise (a bare GPU machine
# with PyTorch, Triton, onnx and onnxruntime, or PYTHON=... given) it uses that Python: it installs the wheels
# in $TOMA_WHEELS (default .whl; scripts/fetch_gpu_wheels.sh fetches them elsewhere) into a temporary folder,
# and runs from a temporary copy of this checkout laid out as the installed package (plugins/ and the
# recipes of engines/ inside toma_export/, as pyproject maps them), so nothing needs building or installing.
# Usage: scripts/gpu_checks.sh [pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."
summary=$(realpath -m "${TOMA_GPU_SUMMARY:-gpu-checks.json}")
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
    py="$PWD/.venv/bin/python"
else
    py=${PYTHON:-python3}
    stage=$(mktemp -d -t toma-gpu-checks.XXXXXX)
    trap 'rm -rf "$stage"' EXIT
    wheels=${TOMA_WHEELS:-.whl}
    if ls "$wheels"/*.whl >/dev/null 2>&1; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$stage/site" \
            "$wheels"/*.whl || { echo "gpu_checks: could not install the wheels in $wheels" >&2; exit 2; }
        export PYTHONPATH="$stage/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    mkdir -p "$stage/tree"
    cp -r toma_export tests pyproject.toml "$stage/tree/" && cp -r plugins "$stage/tree/toma_export/plugins" \
        && mkdir "$stage/tree/toma_export/recipes" && cp engines/*.py engines/*.json "$stage/tree/toma_export/recipes/" \
        || { echo "gpu_checks: could not copy the checkout to $stage" >&2; exit 2; }
    cd "$stage/tree"
fi
missing=$("$py" -c "
import importlib.util as u
print(' '.join(m for m in ('torch', 'triton', 'diffusers', 'onnx', 'onnxruntime', 'pytest') if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
    echo "gpu_checks: $py lacks $missing; fetch wheels with scripts/fetch_gpu_wheels.sh and carry them in .whl/" >&2
    exit 2
fi
unset TRITON_INTERPRET
export TOMA_GPU_CHECKS=1 TOMA_CHECKS_JSON="$summary" HF_HUB_OFFLINE=1
"$py" -m pytest -v -rs -p no:cacheprovider tests/test_gpu.py "$@"
status=$?
echo "gpu_checks: summary in $summary" >&2
exit $status
