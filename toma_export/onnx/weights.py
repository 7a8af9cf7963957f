"""Weights as data: an export is traced with no weights in memory, then each weight is placed where the graph
reads it, under its `state_dict` key.

Tracing a module whose parameters are on the meta device records the graph and the parameters' names,
shapes and dtypes, and nothing else. The graph's initializers are renamed to the network's `state_dict`
keys, so that a weight can be found, swapped or refitted by name, and each one points at its bytes with ONNX
external data (location, offset, length). Where the model folder's safetensors file already holds a weight
in the export's dtype, `--link-weights` points the graph into that file, hard-linked into the export's
folder: nothing is copied. Every other weight (converted, fused with a LoRA, or from a module in memory) is
streamed into `model.onnx.data`, a tensor at a time, so memory holds the graph and at most one tensor.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..weightfiles import WeightSource

ALIGN = 64                  # each tensor starts on a 64-byte boundary in the data file (aligned loads)


def _key(name: str, prefix: str) -> str:
    """The state_dict key of an initializer the trace named `prefix + key`."""
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def hide(model, source: WeightSource, prefix: str = "") -> None:
    """Clear the value of every initializer that is one of `source`'s weights (not a constant the trace
    lifted), so that no optimizer rule may read, fold or drop it; `write` streams exactly these."""
    stored = set(source.keys())
    for name, value in model.graph.initializers.items():
        if _key(name, prefix) in stored:
            value.const_value = None


def place(tensors: list, source: WeightSource, onnx_path: Path, link: bool = False,
          progress=None) -> tuple[dict, dict]:
    """Put each weight (key, torch dtype, bytes the graph expects or None) where the graph `onnx_path` will read
    it: streamed into its own data file (model.onnx.data beside model.onnx); or with `link`, a weight stored in
    a safetensors file in the export's dtype and untouched by a LoRA stays in that file, hard-linked into the
    graph's folder (no copy, no extra disk). A folder on another filesystem cannot be linked: then every weight
    is copied, and progress says so.
    Returns ({key: (file, offset, length)}, summary for the metadata)."""
    from ..errors import ArtifactError

    folder, data = onnx_path.parent, onnx_path.with_name(onnx_path.name + ".data")
    where, links = {}, {}
    offset = written = 0
    with open(data, "wb") as out:
        for i, (key, dtype, expected) in enumerate(tensors):
            span = source.stored(key, dtype) if link else None
            if span is not None and span[0] not in links:
                name = _link(span[0], folder, progress)
                if name is None:
                    link, span = False, None
                else:
                    links[span[0]] = name
            if span is not None:
                f, begin, end = span
                where[key] = (links[f], begin, end - begin)
            else:
                pad = -offset % ALIGN
                out.write(b"\0" * pad)
                offset += pad
                length = 0
                for piece in source.chunks(key, dtype):
                    out.write(piece)
                    length += len(piece)
                where[key] = (data.name, offset, length)
                offset += length
                written += length
            if expected is not None and where[key][2] != expected:
                raise ArtifactError(f"{key} of {source.describe} is {where[key][2]} bytes where the graph holds "
                                    f"{expected}; its shape differs from the architecture's: export it with --force")
            if progress and (i + 1) % 200 == 0:
                progress(f"[export] placed {i + 1}/{len(tensors)} weights")
    total = sum(length for _, _, length in where.values())
    return where, dict(file=data.name, files=[data.name, *links.values()], tensors=len(tensors), bytes=total,
                       written=written, linked=sorted(str(f) for f in links), source=source.describe)


def _link(path: Path, folder: Path, progress) -> str | None:
    """Hard-link a weights file into the export's folder (ONNX Runtime refuses paths that leave the model's
    folder, and symlinks out of it); None where the filesystem refuses, with the reason said once."""
    import os

    try:
        os.link(path, folder / path.name)
    except OSError as err:
        if progress:
            progress(f"[export] cannot hard-link {path.name} into the export ({err.strerror or err}; another "
                     "filesystem?): copying the weights into model.onnx.data instead")
        return None
    return path.name


def write(model, onnx_path: Path, source: WeightSource, prefix: str = "", link: bool = False, progress=None) -> dict:
    """Rename the traced `model`'s weights (its initializers without a value, after `hide`) from `prefix + key`
    to `key` and place each one (`place`), in the dtype the graph declares for it. Returns the summary."""
    import onnx_ir as ir

    inits = [(name, v) for name, v in model.graph.initializers.items() if v.const_value is None]   # the weights
    where, summary = place([(_key(n, prefix), _torch_dtype(v.dtype), None) for n, v in inits], source, onnx_path,
                           link, progress)
    for name, value in inits:
        key = _key(name, prefix)
        location, offset, length = where[key]
        value.const_value = ir.ExternalTensor(location, offset, length, value.dtype, shape=value.shape, name=key,
                                              base_dir=str(onnx_path.parent))
        value.name = key
    return summary


def rewrite(onnx_path: Path, source: WeightSource, link: bool = False, progress=None) -> dict:
    """Place the weights of an existing graph (`onnx_path`, copied from another export of the same graph) from
    `source`, and point the graph's initializers at them. Returns the summary."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    tensors = [(t.name, _ONNX_TO_TORCH[t.data_type], int(_external(t)["length"])) for t in model.graph.initializer]
    where, summary = place(tensors, source, onnx_path, link, progress)
    for tensor in model.graph.initializer:
        location, offset, length = where[tensor.name]
        del tensor.external_data[:]
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=k, value=v)
    onnx.save(model, str(onnx_path))
    return summary


def check(onnx_path: Path) -> None:
    """The ONNX checker (full_check) on the graph, and here every weight's external data: in a file inside the
    export's folder, within the file. The checker itself refuses any hard-linked file, so it sees the weights
    as graph inputs of the same names, dtypes and shapes."""
    import onnx

    from ..errors import ArtifactError

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = onnx.ModelProto()
    graph.CopyFrom(model)
    graph.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                             for t in graph.graph.initializer)
    del graph.graph.initializer[:]
    onnx.checker.check_model(graph, full_check=True)
    folder = onnx_path.parent
    sizes: dict = {}
    for tensor in model.graph.initializer:
        info = _external(tensor)
        location = info.get("location")
        if tensor.data_location != onnx.TensorProto.EXTERNAL or not location or "/" in location or ".." in location:
            raise ArtifactError(f"{onnx_path}: weight {tensor.name} is not in a file beside it; export it again")
        if location not in sizes:
            path = folder / location
            sizes[location] = path.stat().st_size if path.is_file() else -1
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if sizes[location] < end:
            raise ArtifactError(f"{onnx_path}: weight {tensor.name} lies beyond the end of {location} (or the file is "
                                "gone); export it again")


def arrays(onnx_path) -> dict:
    """Every weight of an export as a numpy array, read at its recorded file, offset and length. onnx.load does
    the same but refuses a hard-linked file (--link-weights, a serving repository's copy)."""
    import numpy as np
    import onnx

    onnx_path = Path(onnx_path)
    out = {}
    for tensor in onnx.load(str(onnx_path), load_external_data=False).graph.initializer:
        info = _external(tensor)
        with open(onnx_path.with_name(info["location"]), "rb") as fh:
            fh.seek(int(info.get("offset", 0)))
            raw = fh.read(int(info["length"]))
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        out[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.dims))
    return out


def _external(tensor) -> dict:
    """An initializer's external-data entries (location, offset, length) as a dict."""
    return {e.key: e.value for e in tensor.external_data}


# onnx.TensorProto data types (onnx_ir's DataType has the same values)
_ONNX_TO_TORCH = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16, 7: torch.int64, 6: torch.int32,
                  9: torch.bool, 11: torch.float64}


def _torch_dtype(dtype) -> torch.dtype:
    return _ONNX_TO_TORCH[int(dtype)]
