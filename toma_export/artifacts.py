"""Artifact folders: named by a hash of everything that changes their content, written atomically.

A stage builds into a hidden temporary folder beside the final one and renames it into place only when
complete, so an interrupted run never leaves a half-written file under a final name, and an existing
final folder is a finished artifact that can be reused.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


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
        raise ValueError(f"output folder {path} is not writable ({err.strerror or err}); choose another "
                         "--output-dir") from None
    return path


@contextlib.contextmanager
def staged_dir(final: Path):
    """Yield a temporary folder that becomes `final` when the block completes, and vanishes otherwise."""
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():            # someone else finished first, or a forced rebuild: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
