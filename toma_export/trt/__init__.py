"""TensorRT engines: backend choice, engine build with the selection plugin, engine checks."""
from .backend import BackendMissing
from .build import BuildError, BuildOptions, EngineMismatch, build, build_split, check_engine, recipe

__all__ = ["BackendMissing", "BuildError", "BuildOptions", "EngineMismatch", "build", "build_split", "check_engine",
           "recipe"]
