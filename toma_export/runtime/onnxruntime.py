"""ONNX Runtime: sessions from a file with the toolkit's options, the ToMA and baseline sessions holding the
same weights once, and runners whose I/O buffers are bound once per input signature.

Why sharing works, and how: the ToMA and the baseline export wrap the same module through ToMAGraph, so
their weights are the same tensors. Names do not always match (the exporter's optimizer folds e.g. the
transposed Linear weights of FLUX into `val_<n>` constants numbered differently in each file), so
initializers are matched by content (dtype, shape, bytes). Each matched tensor becomes one OrtValue over
one numpy array, handed to both sessions with `SessionOptions.add_initializer` under each file's own
name. Two session settings keep ORT from copying it back per session: prepacking is disabled
(`session.disable_prepacking`: packed GEMM weights are per-session copies, and a user-owned initializer
cannot be released after packing) and the optimization level is EXTENDED (the ALL level's NCHWc layout
transform writes reordered copies of the convolution weights). Both cost some CPU speed; a ToMA session
alone keeps ORT's defaults.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ArtifactError, UsageError

log = logging.getLogger("toma_export")
MIN_SHARED_BYTES = 1024          # small constants (shapes, scalars) are left to each session


def providers() -> list[str]:
    """CUDA first where onnxruntime-gpu can use it, then CPU."""
    import onnxruntime as ort

    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]


def session_options(threads: int | None = None, spinning: bool = True, quiet: bool = False):
    """SessionOptions with `threads` intra-op threads (one inter-op); spinning=False lets idle pool threads
    sleep, so sessions timed in turn do not steal each other's cores; quiet drops ORT's warnings."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if quiet:
        so.log_severity_level = 3
    return so


def load_session(path, options=None, provider_list=None):
    """The one place a session is created: a file ONNX Runtime cannot load is one ArtifactError."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), options, providers=provider_list or providers(),
                                    disabled_optimizers=_kept_apart(path))
    except Exception as err:     # noqa: BLE001 - onnxruntime raises its own types for a corrupt or foreign file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ArtifactError(f"ONNX Runtime cannot load {path} ({first[:300]}); export it again") from None


def _kept_apart(path) -> list:
    """Optimisers to leave off for this file. In an 8-bit graph, fusing a Linear's MatMul with its bias Add into
    a Gemm first hides the DequantizeLinear -> MatMul pattern that ONNX Runtime turns into its integer kernel
    (MatMulIntegerToFloat, bias included): left on, the int8 graph runs in float, slower than unquantized."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:            # noqa: BLE001 - the session's own load says what is wrong with the file
        return []
    return ["MatMulAddFusion"] if any(n.op_type == "QuantizeLinear" for n in graph.node) else []


@dataclass
class Sharing:
    """What add_initializer sharing achieved between two files."""

    shared: int = 0                 # tensors held once for both sessions
    shared_bytes: int = 0
    unshared_bytes: int = 0         # baseline tensors with no identical ToMA tensor (held by the baseline only)
    by_name: int = 0                # of the shared tensors, how many carry the same name in both files
    arrays: list = field(default_factory=list, repr=False)   # keeps the shared memory alive

    def summary(self) -> str:
        return (f"{self.shared} tensors ({self.shared_bytes / 2**20:.1f} MiB) held once for both sessions, "
                f"{self.by_name} of them under the same name; {self.unshared_bytes / 2**20:.2f} MiB not shared")


def _initializers(path) -> dict:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _key(array: np.ndarray) -> tuple:
    return array.dtype.str, array.shape, hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def lean_options():
    """SessionOptions that keep no per-session copy of the weights: no prepacking, EXTENDED optimisation."""
    import onnxruntime as ort

    so = session_options()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def shared_options(toma_path, baseline_path):
    """SessionOptions for both files with their identical initializers injected once."""
    import onnxruntime as ort

    toma, base = _initializers(toma_path), _initializers(baseline_path)
    by_key = {}
    for name, array in toma.items():
        if array.nbytes >= MIN_SHARED_BYTES:
            by_key.setdefault(_key(array), name)
    options = [lean_options(), lean_options()]
    sharing = Sharing()
    values = {}
    for name, array in base.items():
        if array.nbytes < MIN_SHARED_BYTES:
            continue
        toma_name = by_key.get(_key(array))
        if toma_name is None:
            sharing.unshared_bytes += array.nbytes
            continue
        if toma_name not in values:
            held = np.ascontiguousarray(toma[toma_name])
            values[toma_name] = ort.OrtValue.ortvalue_from_numpy(held)
            sharing.arrays.append((held, values[toma_name]))
            options[0].add_initializer(toma_name, values[toma_name])
            sharing.shared += 1
            sharing.shared_bytes += held.nbytes
        options[1].add_initializer(name, values[toma_name])
        sharing.by_name += toma_name == name
    return options[0], options[1], sharing


class OrtRunner:
    """One session; inputs and outputs live in numpy buffers bound once per input signature (IOBinding),
    so a denoising loop at one size allocates nothing per step besides the returned copies."""

    def __init__(self, session):
        self.session = session
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.outputs = [o.name for o in session.get_outputs()]
        self.bindings: dict = {}

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def run(self, feeds: dict) -> dict:
        """feeds: {name: torch tensor or numpy array}; returns {name: torch tensor on the CPU}."""
        arrays = {n: np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
                  for n, v in feeds.items()}
        missing = set(self.inputs) - set(arrays)
        if missing:
            raise UsageError(f"missing graph inputs: {', '.join(sorted(missing))}")
        signature = tuple((n, arrays[n].shape) for n in self.inputs)
        bound = self.bindings.get(signature)
        if bound is None:
            # first call at this signature: ORT allocates, and the shapes it returns size the buffers
            outs = self.session.run(self.outputs, {n: arrays[n] for n in self.inputs})
            self.bindings[signature] = self._bind(arrays, outs)
            return {n: torch.from_numpy(np.array(o)) for n, o in zip(self.outputs, outs)}
        binding, in_bufs, out_bufs = bound
        for n, buf in in_bufs.items():
            np.copyto(buf, arrays[n], casting="same_kind" if buf.dtype.kind == "f" else "unsafe")
        self.session.run_with_iobinding(binding)
        return {n: torch.from_numpy(buf.copy()) for n, buf in out_bufs.items()}

    def _bind(self, arrays: dict, outs: list):
        import onnxruntime as ort

        binding = self.session.io_binding()
        in_bufs, out_bufs = {}, {}
        for n in self.inputs:
            in_bufs[n] = np.array(arrays[n], copy=True, order="C")
            binding.bind_ortvalue_input(n, ort.OrtValue.ortvalue_from_numpy(in_bufs[n]))
        for n, o in zip(self.outputs, outs):
            out_bufs[n] = np.empty_like(o)
            binding.bind_ortvalue_output(n, ort.OrtValue.ortvalue_from_numpy(out_bufs[n]))
        return binding, in_bufs, out_bufs


def open_pair(toma_path, baseline_path=None, share: bool = True, provider_list=None):
    """(toma OrtRunner or None, baseline OrtRunner or None, Sharing or None)."""
    if toma_path and baseline_path and share:
        so_toma, so_base, sharing = shared_options(toma_path, baseline_path)
        log.info("onnxruntime: %s", sharing.summary())
    else:
        so_toma, so_base, sharing = session_options(), session_options(), None
    toma = OrtRunner(load_session(toma_path, so_toma, provider_list)) if toma_path else None
    base = OrtRunner(load_session(baseline_path, so_base, provider_list)) if baseline_path else None
    return toma, base, sharing
