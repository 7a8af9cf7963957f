"""Artifacts: exported model.onnx files and built engines, with the metadata written beside them.

The one place that names, writes and reads them. Folders are named by a hash of everything that changes
their content and written atomically: a stage builds into a hidden temporary folder beside the final one
and renames it into place only when complete, so an existing final folder is a finished artifact that can
be reused. Metadata (toma.json beside an export, engine.json beside an engine) is read only through
`Artifact.load`, which turns a missing, corrupt or foreign file into one `ArtifactError` line, and the
ToMA settings round-trip through `toma_section` / `config_from_section` with every ToMAConfig field.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .errors import ArtifactError, UsageError
from .toma.config import ToMAConfig

EXPORT_META, ENGINE_META = "toma.json", "engine.json"
EXPORT_FORMAT = 2          # bump when the layout of toma.json or the graph I/O changes (2: int32 [1] recompute)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# numpy dtype names, as the metadata records graph inputs and outputs
NUMPY_TO_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
_REQUIRED = {"onnx": ("format", "key", "model", "onnx", "dtype", "dynamic", "inputs", "outputs", "toma"),
             "engine": ("backend", "backend_version", "model", "engine", "dtype", "dynamic", "inputs", "outputs",
                        "profiles", "toma", "selection")}
_MADE_BY = {"onnx": "`toma-export export`", "engine": "`toma-export build`"}


def toma_section(config: ToMAConfig | None) -> dict | None:
    """Every ToMAConfig field as JSON (tuples as lists); None for a model without ToMA."""
    if config is None:
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def config_from_section(section: dict | None, where: str = "the metadata") -> ToMAConfig | None:
    """The ToMAConfig a toma section records, every field restored; derived keys (groups, node counts)
    are ignored. A section ToMAConfig refuses is a corrupt artifact."""
    if not section:
        return None
    names = {f.name for f in fields(ToMAConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in section.items() if k in names}
    try:
        return ToMAConfig(**values)
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{where} records ToMA settings this toolkit refuses ({err}); export it again") from None


def cache_key(fields: dict) -> str:
    """A short stable hash of JSON-able fields."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def writable_dir(path) -> Path:
    """Create `path` if needed and prove it writable, or raise a one-line error."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UsageError(f"output folder {path} is not writable ({err.strerror or err}); choose another "
                         "--output-dir") from None
    return path


@contextlib.contextmanager
def staged_dir(final: Path):
    """Yield a temporary folder that becomes `final` when the block completes, and vanishes otherwise.

    The temporary name carries the host and process id, so that a later run removes what a killed run left
    (a real-size export leaves gigabytes) without touching a run still in progress."""
    final = Path(final)
    prefix = f".{final.name}.tmp-{socket.gethostname()}-"
    remove_abandoned(final.parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=final.parent))
    usual_mode(tmp)
    try:
        yield tmp
        if final.exists():            # someone else finished first, or a forced rebuild: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def usual_mode(path: Path) -> None:
    """The mode an ordinary create gives under this umask, for what its maker made private (mkdtemp: 0700,
    safetensors: 0600): a server running as another user (tritonserver in a container) must read what we publish."""
    mask = os.umask(0o077)          # read it back; for that instant other threads' files get a stricter mode
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def claimed(final: Path, progress=None):
    """Hold `final` for this process while it makes it: a second process asking for the same artifact waits
    here and then finds it finished, instead of making it again and replacing it under the first one's readers.

    The lock is an flock on a hidden file beside `final`, so a killed holder frees it at once. The holder
    removes the file when done; a waiter that locked a removed file tries again on the new one."""
    final = Path(final)
    path = final.parent / f".{final.name}.lock"
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                progress(f"[wait] another process is making {final.name}; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def link_or_copy(source: Path, dest: Path) -> bool:
    """A hard link to `source` at `dest` (no second copy on disk), else a copy where the filesystem has no hard
    links or `dest` lies on another one. True when linked."""
    try:
        os.link(source, dest)
        return True
    except OSError:
        shutil.copyfile(source, dest)
        return False


def remove_abandoned(folder: Path, prefix: str) -> None:
    """Remove `<prefix><pid>-*` staging folders whose process is gone."""
    for path in Path(folder).glob(prefix + "*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:             # someone else's process: alive
        return True
    return True


def source_digest() -> str:
    """A hash of the toolkit's own sources: part of every artifact key, so an edited checkout (where the
    version number stays put) never reuses an artifact made by other code."""
    from .resources import source_files     # the installed package's files, found through the import system

    digest = hashlib.sha256()
    for name, path in source_files():
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def versions(*packages: str) -> dict:
    """Installed versions of the named distributions (None when missing)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


@dataclass(frozen=True)
class Artifact:
    """An export (kind "onnx": `path` is model.onnx) or an engine (kind "engine": `path` is engine.json,
    the plan beside it), with its metadata."""

    kind: str
    path: Path
    meta: dict

    @classmethod
    def load(cls, path, kind: str | None = None) -> "Artifact":
        """From model.onnx, toma.json, engine.json, engine.plan or the folder holding one of them. `kind`
        restricts what is accepted. Every problem is one ArtifactError that says what to pass instead."""
        want = {"onnx": "an exported model.onnx (toma-export export)",
                "engine": "a built engine's engine.json (toma-export build)"}
        wanted = want[kind] if kind else f"{want['onnx']} or {want['engine']}"
        path = Path(path).expanduser()
        names = {"onnx": (EXPORT_META,), "engine": (ENGINE_META,)}.get(kind, (ENGINE_META, EXPORT_META))
        if path.is_dir():
            found = [path / n for n in names if (path / n).is_file()]
            if not found:
                raise ArtifactError(f"{path}: no {' or '.join(names)} in this folder; pass {wanted}")
            meta_path = found[0]
        else:
            meta_path = {".plan": path.with_name(ENGINE_META), ".onnx": path.with_name(EXPORT_META)}.get(
                path.suffix, path)
            if not path.exists():
                raise ArtifactError(f"{path} does not exist; pass {wanted}")
            if meta_path.name not in names:
                what = {EXPORT_META: "an export's metadata", ENGINE_META: "an engine's metadata"}.get(
                    meta_path.name, "not an artifact of this toolkit")
                raise ArtifactError(f"{path} is {what}; pass {wanted}")
            if not meta_path.is_file():
                raise ArtifactError(f"{path} has no {meta_path.name} beside it (written by "
                                    f"{_MADE_BY['onnx' if meta_path.name == EXPORT_META else 'engine']}); pass {wanted}")
        found_kind = "engine" if meta_path.name == ENGINE_META else "onnx"
        meta = _read_json(meta_path, found_kind)
        missing = [k for k in _REQUIRED[found_kind] if k not in meta]
        if missing:
            raise ArtifactError(f"{meta_path} is not metadata written by {_MADE_BY[found_kind]} (no "
                                f"{', '.join(missing)}); pass {wanted}")
        if found_kind == "onnx" and meta["format"] != EXPORT_FORMAT:
            raise ArtifactError(f"{meta_path} is export format {meta['format']}, this toolkit reads {EXPORT_FORMAT}; "
                                f"export it again (toma-export export --model {meta['model']} ...)")
        bad = [t for t in list(meta["inputs"]) + list(meta["outputs"])
               if not (isinstance(t, dict) and isinstance(t.get("name"), str) and t.get("dtype") in NUMPY_TO_TORCH
                       and isinstance(t.get("shape"), list))]
        if bad or meta["dtype"] not in DTYPES:
            raise ArtifactError(f"{meta_path} records a graph input/output or dtype this toolkit does not know; "
                                "export or build it again")
        config_from_section(meta["toma"], str(meta_path))        # a corrupt section fails here, not later
        if found_kind == "engine":
            plan = meta_path.with_name("engine.plan")
            if not plan.is_file():
                raise ArtifactError(f"{meta_path.parent} has no engine.plan beside engine.json; rebuild it with "
                                    f"`toma-export build --model {meta['model']}`")
            if meta.get("engine_bytes") not in (None, plan.stat().st_size):
                raise ArtifactError(f"{plan} is {plan.stat().st_size} bytes but engine.json records "
                                    f"{meta['engine_bytes']} (a partial copy?); rebuild it with "
                                    f"`toma-export build --model {meta['model']}`")
            return cls("engine", meta_path, meta)
        onnx = meta_path.with_name("model.onnx")       # beside the metadata, so a moved folder still works
        if not onnx.is_file():
            raise ArtifactError(f"{meta_path.parent} has no model.onnx beside toma.json; export it again")
        return cls("onnx", onnx, meta)

    def save(self) -> None:
        """Write the metadata beside the artifact (inside a staged folder, before it is renamed)."""
        name = ENGINE_META if self.kind == "engine" else EXPORT_META
        self.path.with_name(name).write_text(json.dumps(self.meta, indent=2))

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
        """The ToMA settings the file was made with, every field (None: a baseline without ToMA)."""
        return config_from_section(self.meta.get("toma"), self.name)

    @property
    def groups(self) -> list[str]:
        return list((self.meta.get("toma") or {}).get("groups", {}))

    @property
    def static_size(self) -> tuple[int, int] | None:
        """(height, width) pixels of a static export; None when the file has a dynamic profile."""
        return None if self.meta.get("dynamic") else (self.meta["height"], self.meta["width"])

    def check_model(self, model_name: str) -> None:
        """Refuse to pair the artifact with another model than the one it was made from."""
        if self.model != model_name:
            raise ArtifactError(f"{self.name} was made from {self.model}, not {model_name}; pass --model "
                                f"{self.model} or the matching file")

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
        """Raise a one-line UsageError naming the first input whose shape the artifact does not accept.
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
            fix = ("re-export covering it: `toma-export export --dynamic --min-size HxW --max-size HxW` (or "
                   "`build --min-size/--max-size`)" if dynamic else
                   "re-export at this size (`toma-export export --height H --width W`, or `generate --size HxW` "
                   "without --onnx/--engine) or with --dynamic")
            raise UsageError(f"{self.name}: input {name} has shape {tuple(shape)}{where}, but {allowed}"
                             f"{self._covered()}; {fix}")

    def pixel_range(self) -> tuple | None:
        """((min height, min width), (max height, max width)) in pixels that an export accepts, or None where
        the metadata does not say (engine.json records shape profiles only)."""
        if self.meta.get("profiles") and self.meta.get("ranges"):
            lo, _, hi = self.meta["ranges"]["sizes"]
            return tuple(lo), tuple(hi)
        if self.meta.get("height"):
            size = (self.meta["height"], self.meta["width"])
            return size, size
        return None

    def _covered(self) -> str:
        pixels = self.pixel_range()
        if pixels is None:
            return ""
        (h0, w0), (h1, w1) = pixels
        if self.meta.get("profiles") and self.meta.get("ranges"):
            b0, _, b1 = self.meta["ranges"]["batch"]
            return f" ({h0}x{w0} to {h1}x{w1} px, batch {b0}-{b1}, CFG counts twice)"
        return f" ({h0}x{w0} px, batch {self.meta.get('batch')}, CFG counts twice)"


def _read_json(path: Path, kind: str) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path} cannot be read as JSON ({err}); {_MADE_BY[kind]} writes it, so make the "
                            "artifact again") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} is not metadata written by {_MADE_BY[kind]}; make the artifact again")
    return meta
