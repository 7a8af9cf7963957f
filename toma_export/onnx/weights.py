"""Weights as data: an export is traced with no weights in memory, then each tensor is streamed into the
export's external data file, one at a time, under its `state_dict` key.

Tracing a module whose parameters are on the meta device records the graph and the parameters' names,
shapes and dtypes, and nothing else. The graph's initializers are renamed to the network's `state_dict`
keys, so that a weight can be found, swapped or refitted by name, and each one points at its bytes in
`model.onnx.data` (ONNX external data: location, offset, length). Those bytes are read from the model
folder's safetensors files a tensor at a time (converted to the export's dtype where they differ, copied
in pieces where not), so memory holds the graph and at most one tensor, whatever the model's size.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from ..families import ModelNotAvailable
from ..families.spec import safetensors_layout

ALIGN = 64                  # each tensor starts on a 64-byte boundary in the data file (aligned loads)
CHUNK = 16 << 20            # bytes copied at a time from a weight file
_SAFETENSORS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


class WeightSource:
    """Tensors by `state_dict` key, handed out as bytes in a requested dtype: from a diffusers folder's weight
    files (sharded or not), else from a module already in memory (the tiny models' seeded random weights, a
    bench block)."""

    def __init__(self, keys, chunks, describe: str):
        self._keys, self._chunks, self.describe = list(keys), chunks, describe

    def keys(self) -> list[str]:
        return self._keys

    def chunks(self, key: str, dtype: torch.dtype):
        """The tensor's bytes in `dtype`, in pieces."""
        return self._chunks(key, dtype)

    @classmethod
    def of_module(cls, module: torch.nn.Module, describe: str = "in memory") -> "WeightSource":
        state = module.state_dict()
        return cls(state, lambda key, dtype: iter([_bytes(state[key].to(dtype))]), describe)

    @classmethod
    def of_files(cls, files: list[Path], describe: str) -> "WeightSource":
        """Safetensors files are read with plain reads at each tensor's offset, never mapped (a mapping's
        pages count as the process's memory): a tensor already in the wanted dtype is copied in 16 MiB
        pieces, one to convert is read whole. .bin files are pickles and are read a file at a time."""
        where: dict = {}
        for f in files:
            if f.suffix == ".safetensors":
                start, header = safetensors_layout(f)
                for key, entry in header.items():
                    if entry["dtype"] not in _SAFETENSORS:
                        raise ModelNotAvailable(f"{f}: {key} is stored as {entry['dtype']}, which an export cannot "
                                                f"read (it reads {', '.join(_SAFETENSORS)}); pass unquantized weights")
                    begin, end = entry["data_offsets"]
                    where[key] = (f, start + begin, start + end, _SAFETENSORS[entry["dtype"]], entry["shape"])
            else:
                where.update(dict.fromkeys(_pickled_keys(f), (f,)))
        pickled: dict = {}

        def chunks(key: str, dtype: torch.dtype):
            f, *span = where[key]
            if not span:                                  # a .bin file: torch.load it (once per file)
                if f not in pickled:
                    pickled.clear()
                    try:
                        pickled[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                    except RuntimeError:               # the legacy (non-zip) format cannot be mapped
                        pickled[f] = torch.load(f, map_location="cpu", weights_only=True)
                yield _bytes(pickled[f][key].to(dtype))
                return
            begin, end, stored, shape = span
            if end == begin:
                return
            with open(f, "rb") as fh:
                fh.seek(begin)
                if stored == dtype:
                    for at in range(begin, end, CHUNK):
                        yield fh.read(min(CHUNK, end - at))
                else:
                    tensor = torch.frombuffer(bytearray(fh.read(end - begin)), dtype=stored).reshape(shape)
                    yield _bytes(tensor.to(dtype))

        return cls(where, chunks, describe)


def _pickled_keys(path: Path) -> list[str]:
    try:
        return list(torch.load(path, map_location="meta", weights_only=True))
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, OSError) as err:
        raise ModelNotAvailable(f"{path}: not a readable PyTorch weights file ({str(err)[:120]})") from None


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


def write(model, data: Path, source: WeightSource, prefix: str = "", progress=None) -> dict:
    """Rename `model`'s weights (its initializers without a value, after `hide`) from `prefix + key` to `key`
    and stream each tensor from `source` into the file `data`, in the dtype the graph declares for it (the
    export's). Returns {file, tensors, bytes, source}."""
    import onnx_ir as ir

    inits = [(name, v) for name, v in model.graph.initializers.items() if v.const_value is None]   # the weights
    offset = 0
    with open(data, "wb") as out:
        for i, (name, value) in enumerate(inits):
            key = _key(name, prefix)
            pad = -offset % ALIGN
            out.write(b"\0" * pad)
            offset += pad
            length = 0
            for piece in source.chunks(key, _torch_dtype(value.dtype)):
                out.write(piece)
                length += len(piece)
            value.const_value = ir.ExternalTensor(data.name, offset, length, value.dtype, shape=value.shape,
                                                  name=key, base_dir=str(data.parent))
            value.name = key
            offset += length
            if progress and (i + 1) % 200 == 0:
                progress(f"[export] streamed {i + 1}/{len(inits)} weights")
    return dict(file=data.name, tensors=len(inits), bytes=offset, source=source.describe)


def _torch_dtype(dtype) -> torch.dtype:
    import onnx_ir as ir

    return {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16,
            ir.DataType.BFLOAT16: torch.bfloat16, ir.DataType.INT64: torch.int64, ir.DataType.INT32: torch.int32,
            ir.DataType.BOOL: torch.bool, ir.DataType.DOUBLE: torch.float64}[dtype]


def _bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's little-endian bytes as ONNX stores them (bf16 as its 16-bit pattern)."""
    t = tensor.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
