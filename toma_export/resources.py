"""Where the toolkit's own files are, and where its artifacts go by default.

The only module that locates packaged files. It asks the import system, never the checkout, so an installed
wheel and an editable checkout behave alike: the build recipes are the package `toma_export.recipes`
(the top-level `engines/` of a checkout, mapped by pyproject.toml) and the kernel sources are
`toma_export.plugins` (`plugins/`).

Default output folder, the first rule that applies:
1. `$TOMA_EXPORT_OUTPUT`;
2. `engines/out/` of the checkout, when the recipes are read from a checkout's `engines/` folder (an
   editable install), as before;
3. `$XDG_CACHE_HOME/toma-export/artifacts` (`~/.cache/toma-export/artifacts` when unset): an installed
   package's folder is no place for artifacts.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from .errors import MissingComponent

RECIPES = "toma_export.recipes"
PLUGINS = "toma_export.plugins"
# What `source_digest` covers: (package, file pattern, recursive?). The recipes are not walked recursively:
# in a checkout their folder holds engines/out/, whose JSON files are artifacts, not sources.
SOURCES = (("toma_export", "*.py", True), (PLUGINS, "*.py", True), (RECIPES, "*.json", False))


def package_dir(package: str) -> Path:
    """The folder of an installed package, found through the import system."""
    try:
        return Path(resources.files(package))
    except ModuleNotFoundError:
        raise MissingComponent(f"the package {package} is missing from this toma-export install; reinstall "
                                "toma-export (in a checkout: pip install -e .)") from None


def recipe_names() -> list[str]:
    """The models and families that have a build recipe."""
    return sorted(path.stem for path in package_dir(RECIPES).glob("*.json"))


def recipe_path(name: str) -> Path:
    """The build recipe `<name>.json`."""
    path = package_dir(RECIPES) / f"{name}.json"
    if not path.is_file():
        raise MissingComponent(f"no build recipe {name!r} in {path.parent} (there are: "
                                f"{', '.join(recipe_names())}); reinstall toma-export if one is missing")
    return path


def default_output() -> Path:
    """The artifact folder used when no --output-dir is given (the rule is in the module docstring)."""
    if os.environ.get("TOMA_EXPORT_OUTPUT"):
        return Path(os.environ["TOMA_EXPORT_OUTPUT"]).expanduser()
    recipes = package_dir(RECIPES)
    if recipes.name == "engines":             # a checkout's recipe folder, mapped by an editable install
        return recipes / "out"
    cache = os.environ.get("XDG_CACHE_HOME", "")
    cache = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"   # XDG: relative values are invalid
    return cache / "toma-export" / "artifacts"


def source_files() -> list[tuple[str, Path]]:
    """(stable name, path) of every source file that `artifacts.source_digest` hashes, in a fixed order.

    The name is the file's place in its package, so an editable checkout and the wheel built from it name
    the same files alike, although in the wheel the plugins and recipes lie inside toma_export/."""
    roots = {package: package_dir(package) for package, _, _ in SOURCES}
    files = []
    for package, pattern, recursive in SOURCES:
        root = roots[package]
        nested = [r for p, r in roots.items() if p != package and r.is_relative_to(root)]
        for path in sorted(root.rglob(pattern) if recursive else root.glob(pattern)):
            if not any(path.is_relative_to(r) for r in nested):
                files.append((f"{package}/{path.relative_to(root).as_posix()}", path))
    return files
