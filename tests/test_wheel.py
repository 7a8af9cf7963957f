"""The toolkit as a user installs it: a wheel built from this checkout, installed into a fresh virtual
environment, building an engine from a folder outside any checkout.

Every layer is real: pip builds the wheel with setuptools (no build isolation and no index, so no network),
`venv` makes the environment, pip installs the wheel into it, and TensorRT-RTX builds the engine on this CPU
machine. The one shortcut: the fresh environment sees the running environment's packages (torch, diffusers,
TensorRT-RTX...) through a .pth file of plain paths, which runs no editable-install finder, so toma_export
there can only be the wheel's copy, and the test checks that it is.
"""
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from toma_export.artifacts import source_digest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("tensorrt_rtx", reason="needs tensorrt-rtx-cu13 (installed by make test) to build the engine")

# The wheel is built from a copy, so that setuptools' build/ and *.egg-info stay out of the checkout and no
# stale file of an earlier build/ can slip into the wheel; out/ folders are artifacts, not sources.
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", ".whl", ".pytest_cache", "__pycache__", "build", "out",
                                     "*.egg-info")


def run(*cmd, **kwargs):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kwargs)
    assert res.returncode == 0, f"{cmd[:4]} exited {res.returncode}:\n{(res.stdout + res.stderr)[-3000:]}"
    return res.stdout


def test_wheel_installs_and_builds_an_engine_outside_the_checkout(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCES)
    stray = src / "engines" / "out" / "flux-tiny-tensorrt-rtx-0" / "engine.json"   # what a build leaves there
    stray.parent.mkdir(parents=True)
    stray.write_text("{}")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", tmp_path / "wheels", src)
    (wheel,) = (tmp_path / "wheels").glob("toma_export-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {f"toma_export/recipes/{p.name}" for p in (ROOT / "engines").glob("*.json")}
    kernels = {f"toma_export/plugins/{p.name}" for p in (ROOT / "plugins").glob("*.py")}
    assert "toma_export/recipes/flux-tiny.json" in recipes and "toma_export/plugins/select_kernel.py" in kernels
    assert recipes | kernels <= names
    modules = {f"{p.relative_to(ROOT).as_posix()}" for p in (ROOT / "toma_export").rglob("*.py")}   # every package
    assert modules <= names, sorted(modules - names)
    assert not [n for n in names if "/out/" in n or n.startswith(("engines/", "plugins/"))]

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel)
    # Only now the running environment's packages: pip must not see (or try to replace) its toma-export.
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    # not the checkout's sources (its root, tests/), but its .venv, where `make test` keeps the packages
    prefix = Path(sys.prefix).resolve()
    paths = [p for p in sys.path if p and Path(p).is_dir() and (not Path(p).resolve().is_relative_to(ROOT)
                                                                or Path(p).resolve().is_relative_to(prefix))]
    (site / "running_env.pth").write_text("\n".join(paths) + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TOMA_EXPORT_OUTPUT")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    where = json.loads(run(python, "-c", "import json, toma_export, toma_export.plugins as p; "
                           "from toma_export import artifacts, resources; print(json.dumps(dict("
                           "package=toma_export.__file__, plugins=p.__file__, recipe=str(resources.recipe_path("
                           "'flux-tiny')), output=str(resources.default_output()), digest=artifacts.source_digest())))",
                           cwd=tmp_path, env=env))
    for key in ("package", "plugins", "recipe"):
        assert Path(where[key]).is_relative_to(site), where
    assert where["output"] == str(tmp_path / "cache" / "toma-export" / "artifacts")
    assert where["digest"] == source_digest()        # the same sources, whether editable or installed

    out = tmp_path / "out"
    meta = json.loads(run(env_dir / "bin" / "toma-export", "build", "--model", "flux-tiny", "--backend",
                          "tensorrt-rtx", "--static", "--output-dir", out, "--json", cwd=tmp_path, env=env))
    engine = Path(meta["engine"])
    assert engine.is_file() and engine.stat().st_size > 0 and engine.is_relative_to(out)
    assert meta["selection"] == "inlined ONNX body" and meta["dynamic"] is False
