"""Timing: every variant of a block becomes a zero-argument callable on one backend, and the callables are
timed round-robin (one call of each per round), so drift of the machine hits baseline and ToMA alike and
their ratio is computed within the same run."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

OPSET = 20


def round_robin(fns: dict, repeats: int, warmup: int, sync=None) -> dict:
    """{name: median ms} over `repeats` rounds after `warmup` untimed rounds."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            if sync:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def torch_call(module: torch.nn.Module, inputs: tuple):
    def run():
        with torch.no_grad():
            return module(*inputs)
    return run


def export_onnx(module: torch.nn.Module, inputs: tuple, path: Path) -> Path:
    """Static-shape ONNX of a benchmark module, written as model exports are: the ToMASelect body attached,
    the weights in external data under their state_dict keys."""
    from ..onnx.export import trace, write_model
    from ..weightfiles import WeightSource

    names = [f"input_{i}" for i in range(len(inputs))]
    write_model(trace(module, inputs, OPSET, input_names=names, output_names=["output"]), path, OPSET,
                WeightSource.of_module(module))
    return path


def onnxruntime_call(path: Path, inputs: tuple, threads: int):
    """A callable running the file in ONNX Runtime's CPU provider with the given intra-op threads, and the
    first output of one run (for the quality column)."""
    from ..runtime.onnxruntime import load_session, session_options

    # Each session owns a thread pool whose threads spin after a run; timed round-robin, one session's
    # spinning threads would steal the cores from the next one (short graphs suffer most), so they sleep.
    opts = session_options(threads, spinning=False, quiet=True)
    session = load_session(path, opts, ["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}

    def run():
        return session.run(None, feed)[0]
    return run
