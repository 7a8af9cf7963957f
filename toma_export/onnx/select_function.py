"""The portable body of `toma::ToMASelect`: greedy facility location unrolled into standard ONNX ops.

Any runtime without the plugin runs this local function (ONNX Runtime, polygraphy, the TensorRT parser,
which inlines it). It mirrors toma_export.toma.selection exactly: fp32 cosine similarity from the Gram matrix,
first pick by row sum, then d-1 steps of exact marginal gain with picked tokens masked, ties within TIE_TOL
to the lowest index. No Loop (TensorRT-RTX cannot build it), no TopK over tokens, no scatter: one-hot rows and
MatMul/Max do the bookkeeping. Each of the d steps is a handful of ops on (B, T, n, n).
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ..errors import UsageError
from ..toma.selection import OP_DOMAIN, OP_NAME, TIE_TOL

_MASK = -1e9   # gain of picked tokens: below any real gain (>= 0), finite so every runtime handles it


class _Body:
    """Accumulates nodes with unique, readable value names."""

    def __init__(self):
        self.nodes, self._n = [], 0

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self._n += 1
        out = f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype=TensorProto.FLOAT, dims=()) -> str:
        vals = value if isinstance(value, (list, tuple)) else [value]
        return self.op("Constant", value=helper.make_tensor("v", dtype, list(dims), vals))


def build(num_dst: int, opset: int) -> onnx.FunctionProto:
    """FunctionProto `toma.ToMASelect`(tiles, previous, recompute) -> destinations, unrolled for num_dst."""
    f = _Body()
    x = f.op("Cast", "tiles", to=TensorProto.FLOAT)
    last = f.const([-1], TensorProto.INT64, dims=[1])
    axis2 = f.const([2], TensorProto.INT64, dims=[1])
    # Cosines from the Gram matrix, as selection.similarity computes them: the wide feature axis is read by
    # one MatMul (the same product as the merge weights', which runtimes can share), not normalised first.
    gram = f.op("MatMul", x, f.op("Transpose", x, perm=[0, 1, 3, 2]))          # (B, T, n, n)
    n = f.op("Gather", f.op("Shape", gram), f.const(3, TensorProto.INT64), axis=0)
    positions = f.op("Range", f.const(0, TensorProto.INT64), n, f.const(1, TensorProto.INT64))  # (n,)
    eye = f.op("Cast", f.op("Equal", f.op("Unsqueeze", positions, f.const([1], TensorProto.INT64, [1])),
                            positions), to=TensorProto.FLOAT)                   # (n, n)
    norm = f.op("Sqrt", f.op("Max", f.op("ReduceSum", f.op("Mul", gram, eye), last, keepdims=0), f.const(1e-24)))
    sim = f.op("Div", gram, f.op("Mul", f.op("Unsqueeze", norm, last), f.op("Unsqueeze", norm, axis2)))

    def first_best(score):                                                      # (B, T, n) -> (B, T, 1)
        top = f.op("ReduceMax", score, last, keepdims=1)
        near = f.op("GreaterOrEqual", score, f.op("Sub", top, f.const(TIE_TOL)))
        return f.op("ArgMax", f.op("Cast", near, to=TensorProto.FLOAT), axis=-1, keepdims=1, select_last_index=0)

    def one_hot(idx):                                                           # (B, T, 1) -> (B, T, n) float
        return f.op("Cast", f.op("Equal", idx, positions), to=TensorProto.FLOAT)

    def row(hot):                                     # the sim row at the pick, (B, T, 1, n): exact, one term
        return f.op("ReduceSum", f.op("Mul", f.op("Unsqueeze", hot, last), sim), axis2, keepdims=1)

    idx = first_best(f.op("ReduceSum", sim, last, keepdims=0))
    picks, hot = [idx], one_hot(idx)
    penalty, cover = f.op("Mul", hot, f.const(_MASK)), row(hot)
    for _ in range(1, num_dst):
        # sum_u max(sim(v, u), cover(u)) is the marginal gain sum_u relu(sim(v, u) - cover(u)) plus
        # sum_u cover(u), the same for every candidate v: one op fewer per step, the same picks and ties.
        gain = f.op("Add", f.op("ReduceSum", f.op("Max", sim, cover), last, keepdims=0), penalty)
        idx = first_best(gain)
        hot = one_hot(idx)
        picks.append(idx)
        penalty = f.op("Add", penalty, f.op("Mul", hot, f.const(_MASK)))
        cover = f.op("Max", cover, row(hot))
    chosen = f.op("Concat", *picks, axis=-1) if num_dst > 1 else picks[0]
    flag = f.op("Cast", "recompute", to=TensorProto.BOOL)                      # int32 [1] broadcasts over (B, T, d)
    f.nodes.append(helper.make_node("Where", [flag, chosen, "previous"], ["destinations"]))
    return helper.make_function(OP_DOMAIN, OP_NAME, ["tiles", "previous", "recompute"], ["destinations"],
                                f.nodes, [helper.make_opsetid("", opset)])


def attach(model: onnx.ModelProto, opset: int) -> int:
    """Append the function body for every distinct destination count used by ToMASelect nodes; returns how
    many selection nodes the graph has. A file without such nodes is left unchanged."""
    nodes = [n for n in model.graph.node if n.domain == OP_DOMAIN and n.op_type == OP_NAME]
    counts = {helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "num_dst"}
    if len(counts) > 1:
        raise UsageError(f"ToMASelect nodes with different destination counts {sorted(counts)}: one function "
                         "per model carries one unrolled count")
    del model.functions[:]
    if counts:
        model.functions.append(build(counts.pop(), opset))
        if not any(o.domain == OP_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(OP_DOMAIN, 1))
    return len(nodes)
