"""toma_export.resources: the recipes of this environment, the default-output rule, and a source digest that
names files the same way in a checkout and in an installed wheel. The two layouts are laid out in tmp_path
(the package lookup is redirected to them); tests/test_wheel.py installs a real wheel."""
from pathlib import Path

import pytest

from toma_export import artifacts, resources
from toma_export.errors import MissingComponent

ROOT = Path(__file__).resolve().parents[1]


def test_recipes_of_this_environment():
    assert resources.recipe_names() == sorted(p.stem for p in (ROOT / "engines").glob("*.json"))
    assert resources.recipe_path("flux-tiny").read_bytes() == (ROOT / "engines" / "flux-tiny.json").read_bytes()
    with pytest.raises(MissingComponent, match=r"no build recipe 'nope' in .* \(there are: flux, flux-tiny"):
        resources.recipe_path("nope")


FILES = {("toma_export", "__init__.py"): "", ("toma_export", "trt/build.py"): "b", (resources.PLUGINS, "__init__.py"): "",
         (resources.PLUGINS, "ptx.py"): "p", (resources.RECIPES, "__init__.py"): "", (resources.RECIPES, "flux.json"): "{}"}


def layout(tmp_path, kind) -> dict:
    """Package folders as a checkout has them (plugins/ and engines/ beside toma_export/, engines/out/ holding a
    build's artifacts) or as an installed wheel has them (plugins/ and recipes/ inside toma_export/)."""
    top = tmp_path / kind / "toma_export"
    dirs = {"toma_export": top, resources.PLUGINS: top.parent / "plugins", resources.RECIPES: top.parent / "engines"}
    files = dict(FILES)
    if kind == "wheel":
        dirs.update({resources.PLUGINS: top / "plugins", resources.RECIPES: top / "recipes"})
    else:
        files[resources.RECIPES, "out/x/engine.json"] = "{}"
    for (package, rel), text in files.items():
        (dirs[package] / rel).parent.mkdir(parents=True, exist_ok=True)
        (dirs[package] / rel).write_text(text)
    return dirs


@pytest.mark.parametrize("kind", ["checkout", "wheel"])
def test_source_files_are_named_alike_in_both_layouts(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(resources, "package_dir", layout(tmp_path, kind).__getitem__)
    assert [name for name, _ in resources.source_files()] == [
        "toma_export/__init__.py", "toma_export/trt/build.py", "toma_export.plugins/__init__.py",
        "toma_export.plugins/ptx.py", "toma_export.recipes/flux.json"]


def test_source_digest_is_the_same_in_both_layouts(tmp_path, monkeypatch):
    digests = []
    for kind in ("checkout", "wheel"):
        monkeypatch.setattr(resources, "package_dir", layout(tmp_path, kind).__getitem__)
        digests.append(artifacts.source_digest())
    assert digests[0] == digests[1]


@pytest.mark.parametrize("kind", ["checkout", "wheel"])
def test_default_output_rule(tmp_path, monkeypatch, kind):
    dirs = layout(tmp_path, kind)
    monkeypatch.setattr(resources, "package_dir", dirs.__getitem__)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TOMA_EXPORT_OUTPUT", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    installed = tmp_path / "home" / ".cache" / "toma-export" / "artifacts"
    expected = dirs[resources.RECIPES] / "out" if kind == "checkout" else installed
    assert resources.default_output() == expected
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")         # invalid by the XDG spec: ignored
    assert resources.default_output() == expected
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resources.default_output() == (expected if kind == "checkout" else tmp_path / "xdg" / "toma-export" /
                                          "artifacts")
    monkeypatch.setenv("TOMA_EXPORT_OUTPUT", "~/artifacts")
    assert resources.default_output() == tmp_path / "home" / "artifacts"


def test_missing_package_is_a_one_line_error():
    with pytest.raises(MissingComponent, match=r"^the package toma_export\.nope is missing .*; reinstall "
                                                r"toma-export \(in a checkout: pip install -e \.\)$"):
        resources.package_dir("toma_export.nope")
