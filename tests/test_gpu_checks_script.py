"""scripts/gpu_checks.sh as one command, on this CPU machine: every GPU check skips with its reason and the
JSON summary records it. Run both ways the script sets itself up: in .venv, and as on a bare GPU machine
(PYTHON given: a temporary copy of the checkout laid out as the installed package). The GPU checks
themselves run only where a GPU is (scripts/gpu_checks.sh there)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the checks run for real: use the script")
@pytest.mark.parametrize("bare", [False, True], ids=["venv", "bare-machine"])
def test_gpu_checks_script_skips_each_check_with_its_reason_and_writes_the_summary(tmp_path, bare):
    summary = tmp_path / "summary.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TOMA_CHECKS_JSON", "PYTHON")}
    env["TOMA_GPU_SUMMARY"] = str(summary)
    if bare:
        env.update(PYTHON=sys.executable, TOMA_WHEELS=str(tmp_path / "no-wheels"))
    res = subprocess.run(["bash", "scripts/gpu_checks.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    doc = json.loads(summary.read_text())
    assert doc["exit_status"] == 0 and doc["machine"]["cuda"] is False and doc["machine"]["torch"]
    names = {c["test"].split("::")[1].split("[")[0] for c in doc["checks"]}
    assert names == {"test_triton_kernel_on_cuda_equals_reference", "test_patch_on_cuda_in_half_precision_matches_fp32",
                     "test_plugin_engine_matches_onnxruntime", "test_bench_gpu_mode",
                     "test_generate_through_a_tensorrt_engine", "test_weightless_engine_matches_the_normal_engine",
                     "test_first_block_cache_engines_skip_where_onnxruntime_does",
                     "test_quantized_engines_against_the_fp16_engine", "test_controlnet_engines_match_onnxruntime"}
    assert doc["counts"] == {"passed": 0, "failed": 0, "skipped": len(doc["checks"])}
    reasons = {c["test"].split("::")[1].split("[")[0]: c["reason"] for c in doc["checks"]}
    assert reasons["test_triton_kernel_on_cuda_equals_reference"].startswith("needs a CUDA GPU")
    assert reasons["test_plugin_engine_matches_onnxruntime"].startswith("needs full TensorRT 10.9+")
    assert reasons["test_weightless_engine_matches_the_normal_engine"].startswith("needs full TensorRT 10.9+")
    staged = Path(doc["machine"]["toma_export"]).parents[1] != ROOT
    assert staged is bare
