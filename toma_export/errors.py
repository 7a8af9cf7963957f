"""The toolkit's errors. Each one is a problem the user can fix (bad input, a missing part, a stale or
broken artifact): the CLI prints it as one line that names the fix. Any other exception is a bug and keeps
its traceback. The subclasses also derive from the builtin a Python caller would expect."""
from __future__ import annotations


class ToMAExportError(Exception):
    """Base of every error the toolkit raises on purpose."""


class UsageError(ToMAExportError, ValueError):
    """A bad option, size, configuration or model input."""


class ArtifactError(ToMAExportError, ValueError):
    """A missing, corrupt or mismatched export / engine / reference file."""


class MissingComponent(ToMAExportError, RuntimeError):
    """A package, GPU or runtime the request needs is not there."""


class ExecutionError(ToMAExportError, RuntimeError):
    """A runtime refused to run something it was given (a failed enqueue, an engine for another GPU)."""


class ModelNotAvailable(MissingComponent):
    """A model's weights, or an encoder's, could not be found or loaded."""
