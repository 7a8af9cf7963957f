"""Weight files: what a network folder's safetensors and .bin files hold, read by key without loading them whole,
and WeightSource, which hands a network's tensors out by `state_dict` key in a requested dtype.

Why here: both the families (loading and checking a folder) and the ONNX export (weights as data) read weight
files, and LoRA fusion (lora.py) wraps a WeightSource, so this layer sits below all three and imports none.
"""
from __future__ import annotations

import json
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch

from .errors import ModelNotAvailable

CHUNK = 16 << 20            # bytes copied at a time from a weight file
_SAFETENSORS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


def weight_files(folder: Path) -> dict:
    """{diffusers file variant (None = plain): [weight files]} of a network folder. Names follow diffusers:
    an optional shard suffix (-00001-of-00003) and variant (.fp16) around .safetensors / .bin."""
    found = {}
    for f in sorted(Path(folder).iterdir()):
        if f.name.startswith("diffusion_pytorch_model") and f.suffix in (".safetensors", ".bin"):
            rest = re.sub(r"^-\d+-of-\d+", "", f.name[len("diffusion_pytorch_model"):]).split(".")[1:-1]
            found.setdefault(rest[0] if rest else None, []).append(f)
    return found


def safetensors_header(path: Path) -> dict:
    """{tensor name: {dtype, shape, data_offsets}} from a .safetensors file's JSON header; no tensor data is
    read. The offsets count from where the data starts (safetensors_layout)."""
    return safetensors_layout(path)[1]


def safetensors_layout(path: Path) -> tuple[int, dict]:
    """(where the tensor data starts in the file, the header without its __metadata__)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


MISMATCH = "the folder is incomplete or mixes files of different models"


def check_keys(found, expected, name: str, folder: Path) -> None:
    """Refuse weight files that do not fit the network, naming a missing or an unused weight."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        what = f"{len(missing)} weights missing (e.g. {missing[0]})" if missing else \
               f"{len(extra)} weights unused (e.g. {extra[0]})"
        raise ModelNotAvailable(f"{name}: the weights in {folder} do not load with its config.json ({what}); "
                                f"{MISMATCH}")


def stored_keys(folder: Path, variant: str | None) -> set | None:
    """Every tensor name the folder's safetensors files hold (None for .bin weights, which need unpickling)."""
    files = weight_files(folder).get(variant, [])
    if not files or any(f.suffix != ".safetensors" for f in files):
        return None
    return {k for f in files for k in safetensors_header(f)}


class WeightSource:
    """Tensors by `state_dict` key, handed out as bytes in a requested dtype: from a diffusers folder's weight
    files (sharded or not), else from a module already in memory (the tiny models' trained weights, a
    bench block)."""

    def __init__(self, shapes: dict, chunks, describe: str, spans=None):
        self._shapes, self._chunks, self.describe = {k: tuple(v) for k, v in shapes.items()}, chunks, describe
        self._spans = spans or (lambda key, dtype: None)

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shapes(self) -> dict:
        return dict(self._shapes)

    def chunks(self, key: str, dtype: torch.dtype):
        """The tensor's bytes in `dtype`, in pieces."""
        return self._chunks(key, dtype)

    def stored(self, key: str, dtype: torch.dtype) -> tuple | None:
        """(file, begin, end) where the tensor's bytes already lie in `dtype` (a safetensors file), else None."""
        return self._spans(key, dtype)

    @classmethod
    def of_module(cls, module: torch.nn.Module, describe: str = "in memory") -> "WeightSource":
        state = module.state_dict()
        return cls({k: v.shape for k, v in state.items()}, lambda key, dtype: iter([tensor_bytes(state[key].to(dtype))]),
                   describe)

    @classmethod
    def of_files(cls, files: list[Path], describe: str) -> "WeightSource":
        """Safetensors files are read with plain reads at each tensor's offset, never mapped (a mapping's
        pages count as the process's memory): a tensor already in the wanted dtype is copied in 16 MiB
        pieces, one to convert is read whole. .bin files are pickles and are read a file at a time."""
        where: dict = {}
        shapes: dict = {}
        for f in files:
            if f.suffix == ".safetensors":
                start, header = safetensors_layout(f)
                for key, entry in header.items():
                    if entry["dtype"] not in _SAFETENSORS:
                        raise ModelNotAvailable(f"{f}: {key} is stored as {entry['dtype']}, which an export cannot "
                                                f"read (it reads {', '.join(_SAFETENSORS)}); pass unquantized weights")
                    begin, end = entry["data_offsets"]
                    where[key] = (f, start + begin, start + end, _SAFETENSORS[entry["dtype"]], entry["shape"])
                    shapes[key] = entry["shape"]
            else:
                found = _pickled_shapes(f)
                where.update(dict.fromkeys(found, (f,)))
                shapes.update(found)
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
                yield tensor_bytes(pickled[f][key].to(dtype))
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
                    yield tensor_bytes(tensor.to(dtype))

        def spans(key: str, dtype: torch.dtype):
            f, *span = where[key]
            return (f, span[0], span[1]) if span and span[2] == dtype else None

        return cls(shapes, chunks, describe, spans)


def _pickled_shapes(path: Path) -> dict:
    try:
        return {k: tuple(v.shape) for k, v in torch.load(path, map_location="meta", weights_only=True).items()}
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, OSError) as err:
        raise ModelNotAvailable(f"{path}: not a readable PyTorch weights file ({str(err)[:120]})") from None


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's little-endian bytes as ONNX stores them (bf16 as its 16-bit pattern)."""
    t = tensor.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
