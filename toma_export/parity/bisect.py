"""--bisect: which transformer block is the first to leave tolerance?

PyTorch side: forward hooks record every transformer block's output in execution order. ONNX side: the
exporter tags each node with its module scopes, so a block's outputs are the values its nodes produce and
nodes outside it consume; those become extra graph outputs of a temporary copy that ONNX Runtime runs on
the same inputs (destinations forced). The first block whose error exceeds the step tolerance is named.
"""
from __future__ import annotations

import ast
import tempfile
from pathlib import Path

import numpy as np
import torch

from .metrics import compare


def torch_block_outputs(graph, feeds: dict) -> list[tuple[str, np.ndarray]]:
    """(block name, image-token output) for every transformer block, in the order they ran."""
    from ..families import FAMILIES

    model = graph.model
    family = next(m for m in FAMILIES.values() if m.supports(model))
    seen: list = []
    handles = []
    for name, block, *_ in family.candidates(model, _Levels()):
        def hook(module, args, output, name=name):
            out = output[-1] if isinstance(output, tuple) else output   # FLUX blocks: (text, image)
            seen.append((name, out.detach().float().numpy().copy()))
        handles.append(block.register_forward_hook(hook))
    try:
        with torch.no_grad():
            graph(*[torch.as_tensor(np.asarray(feeds[n])) for n in graph.input_names])
    finally:
        for h in handles:
            h.remove()
    return seen


class _Levels:
    levels = 1     # candidates() reads config.levels only to mark defaults; every block is listed anyway


def onnx_block_outputs(onnx_path: str, blocks: list[str], feeds: dict) -> dict[str, list[np.ndarray]]:
    """Every boundary value of each block's scope, computed by ONNX Runtime."""
    import onnx

    from ..runtime.onnxruntime import load_session

    model = onnx.load(onnx_path)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    scopes = {}
    for node in model.graph.node:
        prop = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "[]")
        scopes[node.name] = set(ast.literal_eval(prop))
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    outputs = {o.name for o in model.graph.output}
    wanted: dict[str, list[str]] = {}
    for block in blocks:
        scope = f"model.{block}"
        for node in model.graph.node:
            if scope not in scopes[node.name]:
                continue
            for value in node.output:
                users = consumers.get(value, [])
                if value in outputs or any(scope not in scopes[u.name] for u in users):
                    wanted.setdefault(block, []).append(value)
    extra = [v for values in wanted.values() for v in values if v in types and v not in outputs]
    model.graph.output.extend(types[v] for v in extra)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bisect.onnx"
        onnx.save(model, str(path))
        session = load_session(path, provider_list=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = dict(zip(names, session.run(None, {k: np.asarray(v) for k, v in feeds.items()})))
    return {b: [values[v] for v in vs if v in values] for b, vs in wanted.items()}


def bisect(graph, onnx_path: str, feeds: dict, rtol: float) -> dict:
    """Per-block errors and the first block beyond `rtol` of its output scale."""
    reference = torch_block_outputs(graph, feeds)
    candidates = onnx_block_outputs(onnx_path, [name for name, _ in reference], feeds)
    rows, first = [], None
    for name, ref in reference:
        options = [c for c in candidates.get(name, []) if np.asarray(c).shape == ref.shape]
        if not options:
            rows.append(dict(block=name, found=False))
            continue
        best = min((compare(ref, c, 0.0, rtol) for c in options), key=lambda s: s["max_abs"])
        rows.append(dict(block=name, found=True, max_abs=best["max_abs"], tolerance=best["tolerance"],
                         cosine=best["cosine"], passed=best["passed"]))
        if first is None and not best["passed"]:
            first = name
    return dict(first_failing_block=first, blocks=rows)
