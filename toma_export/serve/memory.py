"""What a merge-step schedule costs in memory on ONNX Runtime: the ToMA session alone, ToMA + baseline
sessions each holding its own weights, and both sessions sharing one copy (runtime.onnxruntime.shared_options).

Each configuration is measured in a fresh process (RSS after `malloc_trim`, before and after creating
the sessions, then after one run of each), so allocator state from one never flatters another.

    python scripts/serve_memory.py --model flux-tiny --size 128x128 [--output-dir D] [--json]
"""
from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys

from ..errors import UsageError

CPU = ["CPUExecutionProvider"]
MODES = {
    "toma": "ToMA session alone (ORT defaults)",
    "separate": "ToMA + baseline, separate weights (ORT defaults)",
    "separate-same-options": "ToMA + baseline, separate weights (EXTENDED, no prepacking)",
    "shared": "ToMA + baseline, shared weights (EXTENDED, no prepacking)",
}


def _rss_mib() -> float:
    import psutil

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)     # give freed heap back, so RSS counts what is held
    except OSError:
        pass
    return psutil.Process().memory_info().rss / 2**20


def _feeds(session) -> dict:
    import numpy as np

    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(bool)": np.bool_}
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        if any(not isinstance(d, int) for d in i.shape):
            raise UsageError(f"{i.name} has a dynamic shape {i.shape}; measure static exports")
        dtype = types[i.type]
        feeds[i.name] = (rng.standard_normal(i.shape).astype(dtype) if dtype in (np.float32, np.float16) else
                         np.ones(i.shape, dtype) if dtype == np.bool_ else np.zeros(i.shape, dtype))
    return feeds


def child(mode: str, toma: str, baseline: str) -> dict:
    """One measurement, in this process."""
    import onnx  # noqa: F401  (imported before the first reading: sharing parses the files with it)
    import onnx.numpy_helper  # noqa: F401

    from ..runtime.onnxruntime import lean_options, load_session, session_options, shared_options

    before = _rss_mib()
    if mode == "toma":
        sessions = [load_session(toma, session_options(), CPU)]
    elif mode == "separate":
        sessions = [load_session(toma, session_options(), CPU), load_session(baseline, session_options(), CPU)]
    else:
        if mode == "shared":
            so_toma, so_base, _ = shared_options(toma, baseline)
        else:
            so_toma, so_base = lean_options(), lean_options()
        sessions = [load_session(toma, so_toma, CPU), load_session(baseline, so_base, CPU)]
    created = _rss_mib()
    for s in sessions:
        s.run(None, _feeds(s))
    ran = _rss_mib()
    return dict(mode=mode, sessions_mib=round(created - before, 1), after_run_mib=round(ran - before, 1))


_CHILD = ("import json, sys; from toma_export.serve.memory import child; "
          "print(json.dumps(child(*sys.argv[1:])))")


def measure(toma: str, baseline: str) -> list[dict]:
    """One row per mode in MODES, each measured in a fresh process."""
    rows = []
    for mode in MODES:
        out = subprocess.run([sys.executable, "-c", _CHILD, mode, toma, baseline], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def weight_bytes(path: str) -> int:
    import onnx

    return sum(len(t.raw_data) for t in onnx.load(path).graph.initializer)
