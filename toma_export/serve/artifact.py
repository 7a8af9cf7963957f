"""Artifact: an exported model.onnx or a built engine.plan, with the metadata written beside it.

Serving needs three things from toma.json / engine.json and nothing else: the graph's I/O (names, dtypes),
the shapes it accepts (one static shape, or a min/max profile) and the ToMA settings the file was made
with, whose schedule (merge_steps, dst_every) the caller must follow. Shapes are checked here, before a
runtime sees them, so that an out-of-range request fails with one line that says what to re-export.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..onnx.export import DTYPES
from ..toma import ToMAConfig

NUMPY_TO_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


@dataclass(frozen=True)
class Artifact:
    kind: str            # "onnx" | "engine"
    path: Path           # model.onnx or engine.json
    meta: dict

    @classmethod
    def load(cls, path) -> "Artifact":
        """From model.onnx, toma.json, engine.json, engine.plan or the folder holding one of them."""
        path = Path(path).expanduser()
        if path.is_dir():
            found = [path / n for n in ("engine.json", "toma.json") if (path / n).is_file()]
            if not found:
                raise ValueError(f"{path}: no toma.json or engine.json in this folder; pass an exported "
                                 "model.onnx (toma-export export) or a built engine's engine.json (toma-export build)")
            path = found[0]
        if path.suffix == ".plan":
            path = path.with_name("engine.json")
        if path.suffix == ".onnx":
            path = path.with_name("toma.json")
        if not path.is_file():
            raise ValueError(f"{path} does not exist; an artifact needs the toma.json (export) or engine.json "
                             "(build) written beside the model")
        meta = json.loads(path.read_text())
        if path.name == "engine.json":
            return cls("engine", path, meta)
        return cls("onnx", Path(meta["onnx"]) if Path(meta["onnx"]).is_file() else path.with_name("model.onnx"),
                   meta)

    @property
    def name(self) -> str:
        return str(self.meta.get("engine") or self.path)

    @property
    def model(self) -> str:
        return self.meta["model"]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.meta["dtype"]]

    @property
    def config(self) -> ToMAConfig | None:
        """The ToMA settings the file was made with (None: a baseline without ToMA)."""
        toma = self.meta.get("toma")
        if not toma:
            return None
        names = {f.name for f in fields(ToMAConfig)}
        return ToMAConfig(**{k: v for k, v in toma.items() if k in names})

    @property
    def groups(self) -> list[str]:
        return list((self.meta.get("toma") or {}).get("groups", {}))

    def input_dtypes(self) -> dict:
        return {i["name"]: NUMPY_TO_TORCH[i["dtype"]] for i in self.meta["inputs"]}

    def input_names(self) -> list[str]:
        return [i["name"] for i in self.meta["inputs"]]

    def allowed(self, name: str) -> tuple[list, list]:
        """(min shape, max shape) the artifact accepts for an input."""
        profile = (self.meta.get("profiles") or {}).get(name)
        if profile:
            return profile["min"], profile["max"]
        shape = next(i["shape"] for i in self.meta["inputs"] if i["name"] == name)
        return shape, shape

    def check_shapes(self, shapes: dict, pixels: tuple[int, int] | None = None) -> None:
        """Raise a one-line ValueError naming the first input whose shape the artifact does not accept.
        `pixels` is the requested image size, quoted in the message."""
        for name, shape in shapes.items():
            lo, hi = self.allowed(name)
            ok = len(lo) == len(shape) and all(isinstance(a, int) and isinstance(b, int) and a <= s <= b
                                               for a, s, b in zip(lo, shape, hi))
            if ok:
                continue
            dynamic = bool(self.meta.get("profiles"))
            allowed = (f"the profile allows {tuple(lo)} to {tuple(hi)}" if dynamic else
                       f"the static export takes exactly {tuple(lo)}")
            where = f" (image {pixels[0]}x{pixels[1]} px)" if pixels else ""
            covered = self._covered()
            fix = ("re-export covering it: `toma-export export --dynamic --min-size HxW --max-size HxW` (or "
                   "`build --min-size/--max-size`)" if dynamic else
                   "re-export at this size (`toma-export export --height H --width W`, or `generate --size HxW` "
                   "without --onnx/--engine) or with --dynamic")
            raise ValueError(f"{self.name}: input {name} has shape {tuple(shape)}{where}, but {allowed}"
                             f"{covered}; {fix}")

    def _covered(self) -> str:
        if self.meta.get("profiles") and self.meta.get("ranges"):
            (h0, w0), _, (h1, w1) = self.meta["ranges"]["sizes"]
            b0, _, b1 = self.meta["ranges"]["batch"]
            return f" ({h0}x{w0} to {h1}x{w1} px, batch {b0}-{b1}, CFG counts twice)"
        if self.meta.get("height"):
            return f" ({self.meta['height']}x{self.meta['width']} px, batch {self.meta.get('batch')}, CFG counts twice)"
        return ""
