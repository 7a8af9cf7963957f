"""`toma-export export-repo`: Triton model repositories written from real TensorRT-RTX engines built here.

The config is parsed with Triton's own ModelConfig protobuf (tritonclient) and checked against engine.json
and the ONNX graph, independently. Serving the plan needs a GPU, full TensorRT and tritonserver's TensorRT
backend, none of which are here, so these tests stop at the files (tests/test_triton_server.py serves the
ONNX pipeline models on a real server)."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import toma_export as te
from toma_export.cli import main
from toma_export.serve.repository import RepositoryError, config_text
from toma_export.trt import BuildOptions, build

pytest.importorskip("tensorrt_rtx", reason="needs tensorrt-rtx-cu13 (installed by make test)")
pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (the test extra)")
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402
from tritonclient.utils import np_to_triton_dtype  # noqa: E402

RTX = "--allow-tensorrt-rtx"


@pytest.fixture(scope="module")
def engines(artifacts, dynamic_export):
    """Engine folders with ToMA: flux-tiny with a dynamic profile, sdxl-tiny static (the same builds as
    test_trt_build's, so a whole-suite run makes each once)."""
    dynamic_export("flux-tiny")                                   # reused by the dynamic build
    quiet = dict(progress=lambda m: None)
    out = {}
    for kind, model, static in (("dynamic", "flux-tiny", False), ("static", "sdxl-tiny", True)):
        meta = build(model, te.ToMAConfig(), artifacts, BuildOptions(backend="tensorrt-rtx", static=static), **quiet)
        out[kind] = Path(meta["engine"]).parent
    return out


def export_repo(*args) -> int:
    return main(["export-repo", *map(str, args)])


def parse(model_dir: Path):
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("toma-export: error: ") and "\n" not in err, err
    return err


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def onnx_io(meta):
    """(name, Triton dtype, dims) of the ONNX graph's inputs and outputs: symbolic axes -1."""
    import onnx

    graph = onnx.load(meta["onnx"], load_external_data=False).graph

    def rows(values):
        return [(v.name, np_to_triton_dtype(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)),
                 [-1 if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]
    return rows(graph.input), rows(graph.output)


def config_io(tensors):
    """The same rows from the config, undoing the [1] -> [] reshape of scalars."""
    return [(t.name, mc.DataType.Name(t.data_type).removeprefix("TYPE_"),
             list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)) for t in tensors]


def test_dynamic_engine_repository(engines, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert export_repo("--engine", engines["dynamic"] / "engine.json", "--out", repo, "--instances", 2, RTX) == 0
    assert "TensorRT-RTX engine, which Triton's TensorRT backend cannot load" in capsys.readouterr().err
    meta = json.loads((engines["dynamic"] / "engine.json").read_text())
    # the plan model and the pipeline model around the same engine; no staging folder left behind
    assert sorted(os.listdir(repo)) == ["flux-tiny", "flux-tiny-pipeline"]
    pipeline = repo / "flux-tiny-pipeline"
    assert sorted(os.listdir(pipeline / "1")) == ["model.py", "network"]
    plan = (engines["dynamic"] / "engine.plan").read_bytes()
    assert (pipeline / "1" / "network" / "engine.plan").read_bytes() == plan
    pcfg = parse(pipeline)
    assert (pcfg.backend, pcfg.max_batch_size, pcfg.instance_group[0].kind) == (
        "python", 4, mc.ModelInstanceGroup.KIND_GPU)                       # the dynamic profile batches 4
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims), t.optional) for t in pcfg.input] == [
        ("prompt", "TYPE_STRING", [1], False), ("height", "TYPE_INT64", [1], False),
        ("width", "TYPE_INT64", [1], False), ("steps", "TYPE_INT64", [1], False),
        ("seed", "TYPE_INT64", [1], False), ("guidance", "TYPE_FP32", [1], True),
        ("max_seconds", "TYPE_FP32", [1], True)]
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in pcfg.output] == [
        ("image", "TYPE_UINT8", [-1, -1, 3])]
    assert pcfg.HasField("dynamic_batching") and pcfg.parameters["network_kind"].string_value == "engine"
    model = repo / "flux-tiny"
    assert sorted(os.listdir(model)) == ["1", "config.pbtxt"] and os.listdir(model / "1") == ["model.plan"]
    assert (model / "1" / "model.plan").read_bytes() == (engines["dynamic"] / "engine.plan").read_bytes()

    cfg = parse(model)
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("flux-tiny", "tensorrt_plan", 0)
    # the engine's I/O, in order, with Triton's dtypes, -1 on dynamic axes, the batch axis kept
    assert config_io(cfg.input) == [(t["name"], np_to_triton_dtype(np.dtype(t["dtype"])),
                                     [d if isinstance(d, int) else -1 for d in t["shape"]]) for t in meta["inputs"]]
    assert [t.name for t in cfg.output] == [t["name"] for t in meta["outputs"]]
    assert (config_io(cfg.input), config_io(cfg.output)) == onnx_io(meta)    # and the ONNX graph agrees
    dims = {t.name: list(t.dims) for t in list(cfg.input) + list(cfg.output)}
    assert dims["hidden_states"] == [-1, -1, -1, 16] and dims["txt_ids"] == [-1, 3]
    assert dims["noise_pred"] == [-1, -1, 16]
    recompute = next(t for t in cfg.input if t.name == "toma_recompute")     # int32 [1]: plugins take no bool
    assert (recompute.data_type, list(recompute.dims), recompute.HasField("reshape")) == (mc.TYPE_INT32, [1], False)
    # every destination input has its output twin, which the client carries back on the next step
    outputs = {t.name: (t.data_type, list(t.dims)) for t in cfg.output}
    carried = [t for t in cfg.input if t.name.startswith("toma_dst.")]
    assert len(carried) == 2 and all(t.data_type == mc.TYPE_INT64 for t in carried)
    assert all(outputs[t.name.replace("toma_dst.", "toma_dst_out.")] == (t.data_type, list(t.dims)) for t in carried)

    (group,) = cfg.instance_group
    assert (group.kind, group.count, list(group.profile)) == (mc.ModelInstanceGroup.KIND_GPU, 2, ["0"])
    text = (model / "config.pbtxt").read_text()
    hs = meta["profiles"]["hidden_states"]
    assert f"#   hidden_states: {hs['min']} / {hs['opt']} / {hs['max']}" in text
    assert f"tensorrt-rtx {meta['backend_version']}" in text


def test_static_engine_has_fixed_dims(engines, tmp_path):
    repo = tmp_path / "repo"
    assert export_repo("--engine", engines["static"], "--out", repo, "--name", "sdxl-static", RTX) == 0
    meta = json.loads((engines["static"] / "engine.json").read_text())
    cfg = parse(repo / "sdxl-static")
    assert cfg.name == "sdxl-static" and cfg.max_batch_size == 0
    for tensors, recorded in ((cfg.input, meta["inputs"]), (cfg.output, meta["outputs"])):
        for t, r in zip(tensors, recorded, strict=True):
            expected = r["shape"] or [1]
            assert t.name == r["name"] and list(t.dims) == expected and all(d > 0 for d in t.dims)
    assert list(next(t for t in cfg.input if t.name == "sample").dims) == [1, 4, 16, 16]
    assert list(next(t for t in cfg.input if t.name == "toma_recompute").dims) == [1]
    (group,) = cfg.instance_group
    assert group.count == 1 and not group.profile
    assert "optimization profile" not in (repo / "sdxl-static" / "config.pbtxt").read_text()
    assert (repo / "sdxl-static" / "1" / "model.plan").read_bytes() == (engines["static"] / "engine.plan").read_bytes()


def test_existing_model_folder_needs_force(engines, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert export_repo("--engine", engines["dynamic"], "--out", repo, "--name", "m", RTX) == 0
    before = snapshot(repo)
    capsys.readouterr()
    assert export_repo("--engine", engines["static"], "--out", repo, "--name", "m", "--instances", 3, RTX) == 2
    err = one_line_error(capsys)
    assert f"{repo / 'm'} already exists; pass --force to replace it" in err
    assert snapshot(repo) == before                                          # untouched, byte for byte

    assert export_repo("--engine", engines["static"], "--out", repo, "--name", "m", "--instances", 3, "--force",
                       RTX) == 0
    assert sorted(os.listdir(repo)) == ["m", "m-pipeline"]
    cfg = parse(repo / "m")
    assert parse(repo / "m-pipeline").max_batch_size == 1 and not parse(repo / "m-pipeline").HasField(
        "dynamic_batching")                                                  # a static engine does not batch
    assert cfg.instance_group[0].count == 3 and cfg.input[0].name == "sample"
    assert (repo / "m" / "1" / "model.plan").read_bytes() == (engines["static"] / "engine.plan").read_bytes()


def test_tensorrt_rtx_engine_is_refused_by_default(engines, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert export_repo("--engine", engines["dynamic"], "--out", repo) == 2
    err = one_line_error(capsys)
    assert "is a TensorRT-RTX engine, which Triton's TensorRT backend cannot load" in err
    assert "--backend tensorrt" in err and "--allow-tensorrt-rtx" in err
    assert not repo.exists()


def test_a_weightless_engine_is_refused(engines, tmp_path, capsys):
    """Triton's TensorRT backend never refits, so a weightless plan would run without its weights (the
    engine.json here is the real one with `weightless` set: such a plan cannot be built without a GPU driver)."""
    import json
    import shutil

    engine = tmp_path / "engine"
    shutil.copytree(engines["dynamic"], engine)
    meta = json.loads((engine / "engine.json").read_text())
    (engine / "engine.json").write_text(json.dumps(dict(meta, weightless="refit")))
    assert export_repo("--engine", engine, "--out", tmp_path / "repo", "--allow-tensorrt-rtx") == 2
    assert "is a weightless plan (refit), which Triton's TensorRT backend would run without its weights" in \
        one_line_error(capsys)
    assert not (tmp_path / "repo").exists()


def test_the_pipeline_model_knows_the_pixel_range_of_an_export_not_of_an_engine(engines, dynamic_export):
    """The served model checks a request's size against the export's recorded range before any work; an
    engine.json records shape profiles only, so there the profiles (Session.check) decide alone."""
    from toma_export.artifacts import Artifact

    assert Artifact.load(dynamic_export("flux-tiny")["onnx"]).pixel_range() == ((128, 128), (512, 512))
    assert Artifact.load(engines["static"] / "engine.json").pixel_range() is None
    assert Artifact.load(engines["dynamic"] / "engine.json").pixel_range() is None


def test_bad_engine_json_is_a_one_line_error(engines, dynamic_export, tmp_path, capsys):
    onnx_meta = dynamic_export("flux-tiny")
    bad = tmp_path / "bad"
    (bad / "empty").mkdir(parents=True)
    (bad / "garbled").mkdir()
    (bad / "garbled" / "engine.json").write_text('{"backend": "tensorrt"')
    (bad / "no-plan").mkdir()
    shutil.copy(engines["dynamic"] / "engine.json", bad / "no-plan")
    (bad / "short-plan").mkdir()
    shutil.copy(engines["dynamic"] / "engine.json", bad / "short-plan")
    (bad / "short-plan" / "engine.plan").write_bytes((engines["dynamic"] / "engine.plan").read_bytes()[:4096])
    cases = {
        tmp_path / "nowhere": "does not exist; pass a built engine's engine.json",
        bad / "empty": "no engine.json in this folder",
        bad / "garbled": "cannot be read as JSON",
        Path(onnx_meta["onnx"]).parent / "toma.json": "is an export's metadata; pass a built engine's engine.json",
        bad / "no-plan": "has no engine.plan beside engine.json; rebuild it with `toma-export build --model "
                         "flux-tiny`",
        bad / "short-plan": "engine.plan is 4096 bytes but engine.json records",
    }
    repo = tmp_path / "repo"
    for engine, message in cases.items():
        assert export_repo("--engine", engine, "--out", repo, RTX) == 2, engine
        assert message in one_line_error(capsys), engine
    assert not repo.exists()


def test_max_batch_size_only_where_triton_can_own_the_batch(engines, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert export_repo("--engine", engines["dynamic"], "--out", repo, "--max-batch-size", 2, RTX) == 2
    err = one_line_error(capsys)
    assert "--max-batch-size needs every input and output to start with the batch axis, but txt_ids" in err
    assert "keep the default 0" in err
    assert export_repo("--engine", engines["static"], "--out", repo, "--max-batch-size", 1, RTX) == 2
    assert "sample has shape [1, 4, 16, 16]" in one_line_error(capsys)
    for option in (("--instances", 0), ("--max-batch-size", -1), ("--name", "../up")):
        assert export_repo("--engine", engines["dynamic"], "--out", repo, *option, RTX) == 2
        one_line_error(capsys)
    assert not (repo / "flux-tiny").exists() and not (repo.parent / "up").exists()

    # The rule on an engine whose every tensor is batched (the dynamic engine's own batched tensors, as
    # a baseline engine without ToMA would record them): Triton takes the batch axis off the dims.
    meta = json.loads((engines["dynamic"] / "engine.json").read_text())
    inputs, outputs = ([t for t in ts if t["shape"] and t["shape"][0] == "batch"]
                       for ts in (meta["inputs"], meta["outputs"]))
    meta.update(inputs=inputs, outputs=outputs,
                profiles={t["name"]: meta["profiles"][t["name"]] for t in inputs})
    cfg = text_format.Parse(config_text(meta, "b", max_batch_size=4), mc.ModelConfig())
    assert cfg.max_batch_size == 4
    dims = {t.name: (list(t.dims), list(t.reshape.shape) if t.HasField("reshape") else None) for t in cfg.input}
    assert dims["hidden_states"] == ([-1, -1, 16], None)
    assert dims["timestep"] == ([1], [])                                    # (batch,) -> [1] per request item
    with pytest.raises(RepositoryError, match=r"--max-batch-size 5 exceeds the engine's batch range \(profile max 4\)"):
        config_text(meta, "b", max_batch_size=5)
