"""`export` in a child process, for callers that go on to other heavy work (an engine build, a validation).

Tracing a model holds the model, the exported program and the exporter's buffers; once freed, most of that
stays in the process's heap and all of it in its peak. In a child process it leaves with the process. The
child is a fresh interpreter (not a fork: it copies none of the caller's memory, and not multiprocessing's
spawn: that re-imports the caller's main script). It takes the request pickled on stdin, writes its log to
stderr like any export, and sends progress messages and then the metadata or the error back on a pipe of
its own, so that nothing a native library prints can garble them.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import traceback

from ..artifacts import Artifact
from ..errors import ExecutionError, ToMAExportError
from .export import ExportOptions, cached

_CHILD = ("import pickle, sys; sys.path[:] = pickle.load(sys.stdin.buffer); "
          "from toma_export.onnx.child import _serve; _serve(int(sys.argv[1]))")


def export_in_child(model_name: str, config, output_dir, options: ExportOptions = ExportOptions(),
                    force: bool = False, progress=None) -> dict:
    """Like `export`, but a finished identical export is reused without starting a process. An error the
    child raises on purpose is raised here as itself (one line in the CLI); any other keeps the child's
    traceback in its message."""
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    meta = None if force else cached(model_name, config, output_dir, options, progress=progress)
    if meta is not None:
        return meta
    read, write = os.pipe()
    with os.fdopen(read, "rb") as messages:
        try:
            child = subprocess.Popen([sys.executable, "-c", _CHILD, str(write)], stdin=subprocess.PIPE, stdout=2,
                                     pass_fds=(write,))
        finally:
            os.close(write)                                # the child's copy stays open: EOF when it exits
        outcome = None
        try:
            with contextlib.suppress(BrokenPipeError):     # a child that died at once: its exit code tells
                pickle.dump(list(sys.path), child.stdin)   # the same toolkit as here, however it was found
                pickle.dump((model_name, config, str(output_dir), options, force), child.stdin)
                child.stdin.close()
            while outcome is None:
                try:
                    kind, value = pickle.load(messages)
                except (EOFError, pickle.UnpicklingError):      # gone, possibly mid-message
                    break
                if kind == "progress":
                    progress(value)
                else:
                    outcome = kind, value
        finally:
            if outcome is None and child.poll() is None:   # interrupted here: do not leave the child running
                child.terminate()
            code = child.wait()
            with contextlib.suppress(OSError):
                child.stdin.close()
    if outcome is None:
        how = f"was killed by signal {-code} (out of memory?)" if code < 0 else f"ended with exit code {code}"
        raise ExecutionError(f"the export process {how} before finishing; its log is above")
    kind, value = outcome
    if kind == "error":
        raise value
    if kind == "bug":
        raise RuntimeError(f"the export process failed:\n{value}")
    return Artifact.load(value, "onnx").meta          # the file on disk is the authority, checked as any other


def _serve(fd: int) -> None:
    """The child's side: one export, its progress and outcome pickled on `fd`."""
    from .export import export

    with os.fdopen(fd, "wb") as out:
        def send(kind, value):
            pickle.dump((kind, value), out)
            out.flush()

        model_name, config, output_dir, options, force = pickle.load(sys.stdin.buffer)
        try:
            meta = export(model_name, config, output_dir, options, force=force,
                          progress=lambda msg: send("progress", msg))
        except ToMAExportError as err:
            send("error", _portable(err))
        except Exception:                  # noqa: BLE001 - a bug: its traceback goes to the caller
            send("bug", traceback.format_exc())
        else:
            send("done", meta["onnx"])


def _portable(err: ToMAExportError) -> ToMAExportError:
    """The error itself when it survives pickling (most do), else its message as an ExecutionError."""
    try:
        return pickle.loads(pickle.dumps(err))
    except Exception:                      # noqa: BLE001 - e.g. an __init__ that takes other arguments
        return ExecutionError(str(err))
