"""Artifact metadata: every ToMAConfig field survives export -> toma.json -> validate and -> serve, and a
missing, corrupt or foreign artifact is one ArtifactError line, in the library and through the CLI.

Real layers: the toma-export CLI, torch.onnx export, ONNX Runtime, the diffusers pipeline. Nothing stands in."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import toma_export as te
from toma_export.artifacts import EXPORT_FORMAT, Artifact, claimed, config_from_section, staged_dir, toma_section
from toma_export.errors import ArtifactError, ToMAExportError
from toma_export.onnx import ExportOptions, export

SIZE = 128
# every field away from its default (levels matters only for UNets, but must still round-trip)
EVERY_FIELD = te.ToMAConfig(ratio=0.25, tile=(2, 4), scale=500.0, blocks=("single_transformer_blocks.*",), levels=2,
                            sublayers=("attn",), merge_steps=3, dst_every=2, weights_every=2)
quiet = dict(progress=lambda m: None)


@pytest.mark.parametrize("config", [te.ToMAConfig(), EVERY_FIELD, te.ToMAConfig(merge_steps=(0, 2, 5), blocks="x.*"),
                                    None])
def test_section_round_trips_every_field(config):
    section = json.loads(json.dumps(toma_section(config)))       # through JSON, as toma.json stores it
    assert config_from_section(section) == config


def test_a_section_toma_refuses_is_an_artifact_error():
    with pytest.raises(ArtifactError, match="export it again"):
        config_from_section(dict(toma_section(te.ToMAConfig()), ratio=3.0), "x/toma.json")


@pytest.fixture(scope="module")
def every_field_export(artifacts):
    """flux-tiny at 128x128 exported with EVERY_FIELD through the CLI, and the baseline its schedule needs."""
    res = subprocess.run([sys.executable, "-m", "toma_export.cli", "export", "--model", "flux-tiny", "--height",
                          str(SIZE), "--width", str(SIZE), "--ratio", "0.25", "--tile", "2x4", "--scale", "500",
                          "--blocks", "single_transformer_blocks.*", "--levels", "2", "--sublayers", "attn",
                          "--merge-steps", "3", "--dst-every", "2", "--weights-every", "2",
                          "--output-dir", str(artifacts), "--json"], capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    base = export("flux-tiny", None, artifacts / "onnx", ExportOptions(height=SIZE, width=SIZE), **quiet)
    return json.loads(res.stdout)["onnx"], base["onnx"]


def test_every_field_round_trips_through_export_validate_and_serve(every_field_export, tmp_path):
    onnx, base = every_field_export
    artifact = Artifact.load(onnx)
    assert artifact.config == EVERY_FIELD
    assert list(artifact.groups) == ["single_transformer_blocks"]          # --blocks reached the patch
    # validate reads the file's settings, not the defaults: parity passes and reports every field
    res = subprocess.run([sys.executable, "-m", "toma_export.cli", "validate", "--model", "flux-tiny", "--onnx", onnx,
                          "--steps", "2", "--json"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert report["passed"] and config_from_section(report["toma"]) == EVERY_FIELD
    assert {c["size"] for c in report["comparisons"]} == {f"{SIZE}x{SIZE}"}         # the static file's own size
    # serve: the drop-in follows the recorded schedule (merge every 3rd step, new destinations every 2nd merge)
    from toma_export.serve import load_network

    network = load_network(onnx, base)
    assert network.schedule.config == EVERY_FIELD
    out = tmp_path / "fox.png"
    res = subprocess.run([sys.executable, "-m", "toma_export.cli", "generate", "--model", "flux-tiny", "--onnx", onnx,
                          "--baseline", base, "--prompt", "a fox", "--steps", "7", "--size", f"{SIZE}x{SIZE}", "--out",
                          str(out), "--json"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout)
    assert config_from_section(result["toma"]) == EVERY_FIELD
    # steps 0, 3, 6 merge; destinations are selected on merged steps 0 and 2 (steps 0 and 6)
    assert result["calls"] == dict(toma=3, recompute=2, baseline=4, cached=0)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_files_with_own_settings_refuse_other_toma_options(every_field_export, tmp_path, cli_here):
    onnx, base = every_field_export
    res = cli_here("generate", "--model", "flux-tiny", "--onnx", onnx, "--baseline", base, "--ratio", "0.5",
                   "--prompt", "x", "--out", tmp_path / "x.png")
    assert res.returncode == 2 and "carry their own ToMA settings" in res.stderr and "--ratio" in res.stderr
    res = cli_here("validate", "--model", "sdxl-tiny", "--onnx", onnx)
    assert res.returncode == 2 and "was made from flux-tiny, not sdxl-tiny" in res.stderr


def _copy(onnx, dest):
    """An export folder's model.onnx and toma.json, copied so the test can damage them."""
    import shutil

    shutil.copytree(Artifact.load(onnx).path.parent, dest)
    return dest


def _damaged(every_field_export, tmp_path):
    onnx, _ = every_field_export
    cases = {}
    cases["missing file"] = (tmp_path / "nowhere" / "model.onnx", "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases["folder without metadata"] = (empty, "toma.json in this folder")
    bare = _copy(onnx, tmp_path / "bare")
    (bare / "toma.json").unlink()
    cases["no toma.json"] = (bare / "model.onnx", "has no toma.json beside it")
    broken = _copy(onnx, tmp_path / "broken")
    (broken / "toma.json").write_text('{"format": 2,')
    cases["corrupt toma.json"] = (broken / "model.onnx", "cannot be read as JSON")
    foreign = _copy(onnx, tmp_path / "foreign")
    (foreign / "toma.json").write_text(json.dumps({"format": EXPORT_FORMAT, "model": "flux-tiny"}))
    cases["foreign toma.json"] = (foreign / "model.onnx", "is not metadata written by `toma-export export`")
    old = _copy(onnx, tmp_path / "old")
    meta = json.loads((old / "toma.json").read_text())
    (old / "toma.json").write_text(json.dumps(dict(meta, format=1)))
    cases["older format"] = (old / "model.onnx", "export format 1")
    return cases


def test_damaged_artifacts_are_one_artifact_error(every_field_export, tmp_path):
    for what, (path, message) in _damaged(every_field_export, tmp_path).items():
        with pytest.raises(ArtifactError) as err:
            Artifact.load(path)
        assert message in str(err.value) and "\n" not in str(err.value), what


def test_engine_metadata_without_its_plan_is_refused(every_field_export, tmp_path):
    engine = tmp_path / "engine"
    engine.mkdir()
    meta = dict(Artifact.load(every_field_export[0]).meta, backend="tensorrt-rtx", backend_version="1.0",
                engine=str(engine / "engine.plan"), selection="inlined ONNX body", engine_bytes=10)
    (engine / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="no engine.plan beside engine.json"):
        Artifact.load(engine, "engine")
    (engine / "engine.plan").write_bytes(b"12345")
    with pytest.raises(ArtifactError, match="is 5 bytes but engine.json records 10"):
        Artifact.load(engine / "engine.plan")
    with pytest.raises(ArtifactError, match="no toma.json"):
        Artifact.load(engine, "onnx")


def test_validate_with_a_missing_or_corrupt_file_is_one_line(every_field_export, tmp_path, cli_here):
    """Through the CLI: exit 2, one line naming the fix, no traceback; a model.onnx ONNX Runtime cannot read
    (toma.json intact) included."""
    cases = _damaged(every_field_export, tmp_path)
    garbage = _copy(every_field_export[0], tmp_path / "garbage")
    (garbage / "model.onnx").write_bytes(b"not a protobuf")
    cases["corrupt model.onnx"] = (garbage / "model.onnx", "ONNX Runtime cannot load")
    for what, (path, message) in cases.items():
        res = cli_here("validate", "--model", "flux-tiny", "--onnx", path)
        lines = [line for line in res.stderr.splitlines() if line.startswith("toma-export: error:")]
        assert res.returncode == 2 and len(lines) == 1 and message in lines[0], (what, res.stderr[-2000:])
        assert "Traceback" not in res.stderr, what


def test_validation_that_checks_nothing_fails(capsys):
    from toma_export.cli import main

    assert main(["validate", "--model", "flux-tiny", "--backends", "torch", "--sizes", "128x128", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["passed"] and report["comparisons"] == [] and "no candidate ran" in report["nothing_compared"]
    assert main(["validate", "--model", "flux-tiny", "--steps", "-1"]) == 2
    assert "--steps must be >= 0" in capsys.readouterr().err


def test_every_toolkit_error_derives_from_one_base():
    from toma_export.errors import ModelNotAvailable
    from toma_export.serve.repository import RepositoryError
    from toma_export.trt import EngineMismatch
    from toma_export.trt.backend import BackendMissing
    from toma_export.trt.build import BuildError
    from toma_export.runtime.tensorrt import ShapeOutOfProfile

    for cls in (ModelNotAvailable, RepositoryError, EngineMismatch, BackendMissing, BuildError, ShapeOutOfProfile,
                ArtifactError):
        assert issubclass(cls, ToMAExportError), cls
    with pytest.raises(ToMAExportError):
        te.ToMAConfig(ratio=1.5)


def test_export_lands_where_build_validate_and_generate_look(artifacts):
    """`export --output-dir D` and the commands that export for themselves share D/onnx, so an export made
    first is reused, not made again."""
    res = subprocess.run([sys.executable, "-m", "toma_export.cli", "export", "--model", "flux-tiny", "--height",
                          str(SIZE), "--width", str(SIZE), "--output-dir", str(artifacts), "--json"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    onnx = json.loads(res.stdout)["onnx"]
    assert Path(onnx).parent.parent == artifacts / "onnx"
    from toma_export.serve.pipeline import serving_artifacts

    said = []
    toma, _ = serving_artifacts("flux-tiny", te.ToMAConfig(), (SIZE, SIZE), 1, "onnxruntime", artifacts,
                                progress=said.append)
    assert toma == onnx and any(m.startswith("[export] reusing") for m in said), said


def test_a_later_run_removes_what_a_killed_run_left(tmp_path):
    """Staging folders carry host and pid: one whose process is gone is removed by the next run of that
    artifact, one whose process lives (a run in progress) is kept."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    prefix = f".x.tmp-{socket.gethostname()}-"
    left = tmp_path / f"{prefix}{dead}-abc"
    left.mkdir()
    (left / "model.onnx.data").write_bytes(b"0" * 4096)
    running = tmp_path / f"{prefix}{os.getpid()}-def"
    running.mkdir()
    with staged_dir(tmp_path / "x") as tmp:
        (tmp / "model.onnx").write_text("done")
    assert not left.exists() and running.is_dir() and (tmp_path / "x" / "model.onnx").read_text() == "done"


def test_published_folders_and_weights_have_the_umask_mode_not_a_private_one(tmp_path):
    """mkdtemp makes 0700 folders and safetensors 0600 files: a tritonserver running as another user could not read
    an artifact or the repository. They get what an ordinary create gives under the umask."""
    from toma_export.quality.train import save

    old = os.umask(0o022)
    try:
        with staged_dir(tmp_path / "x") as tmp:
            (tmp / "model.onnx").write_text("done")
        save({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644


def test_a_second_process_waits_for_the_artifact_the_first_is_making(tmp_path):
    """Two processes asking for one artifact: the second says it waits, and gets the claim only once the first
    lets go (so it finds the artifact finished instead of making it again). No lock file is left behind."""
    final = tmp_path / "model-abc"
    waiter = ("import sys; from pathlib import Path; from toma_export.artifacts import claimed\n"
              "with claimed(Path(sys.argv[1]), progress=lambda m: print(m, flush=True)):\n"
              "    print('claimed', Path(sys.argv[1]).is_dir(), flush=True)\n")
    with claimed(final):
        assert (tmp_path / ".model-abc.lock").is_file()
        child = subprocess.Popen([sys.executable, "-c", waiter, str(final)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "[wait] another process is making model-abc; waiting for it\n"
        final.mkdir()                                   # the first process finishes its artifact...
    out, _ = child.communicate(timeout=60)              # ...and only then the second one holds the claim
    assert child.returncode == 0 and out == "claimed True\n"
    assert list(tmp_path.iterdir()) == [final]


@pytest.mark.parametrize("model,dtype", [("flux-tiny", "bf16"), ("sdxl-tiny", "fp16")])
def test_torch_candidates_run_in_their_own_dtype(model, dtype, capsys):
    """validate --dtype fp16/bf16 feeds the PyTorch candidate in its dtype (the reference's inputs are fp32)."""
    from toma_export.cli import main

    code = main(["validate", "--model", model, "--backends", "torch", "--dtype", dtype, "--sizes", f"{SIZE}x{SIZE}",
                 "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["passed"], report
    assert {tuple(c["backends"]) for c in report["comparisons"]} == {("torch-fp32", f"torch-{dtype}")}
