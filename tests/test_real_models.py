"""Real architectures from diffusers folders: reduced-depth, real-width FLUX.1-dev / schnell and SDXL base
with random weights, written by save_pretrained in the layouts the hub uses (pipeline folder, bare network
folder, sharded and fp16-variant weights, the Hugging Face cache). Real layers: diffusers loading, the
toolkit's folder detection, torch.onnx export and ONNX Runtime. Stand-in: random weights for downloaded ones."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import toma_export as te
from conftest import in_hub_cache, run
from toma_export.errors import ModelNotAvailable, UsageError
from toma_export.models import real_configs


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    """Pipeline folders, written once per session: FLUX.1-dev cut to 1+2 blocks (bf16, sharded like the
    hub's), FLUX.1-schnell cut to 1+1, SDXL base cut to one transformer per level (fp16-variant files)."""
    root = tmp_path_factory.mktemp("real")
    return dict(
        dev=real_configs.write("flux-dev", root / "dev", blocks=(1, 2), max_shard_size="500MB"),
        schnell=real_configs.write("flux-schnell", root / "schnell", blocks=(1, 1)),
        sdxl=real_configs.write("sdxl-base", root / "sdxl", transformer_depths=(1, 1, 1), file_variant="fp16"),
    )


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "toma_export.cli", *args], capture_output=True, text=True,
                          timeout=900, env=env)


@pytest.mark.parametrize("name,family,variant,dtype,text_len,file_variant", [
    ("dev", "flux", "dev", "bf16", 512, None),
    ("schnell", "flux", "schnell", "bf16", 256, None),
    ("sdxl", "sdxl", "base", "fp16", 77, "fp16"),
])
def test_pipeline_and_bare_folders_are_detected(real, name, family, variant, dtype, text_len, file_variant):
    folder = real[name]
    for path in (folder, folder / te.models.get(str(folder)).subfolder):     # pipeline layout, then bare folder
        spec = te.models.get(str(path))
        assert (spec.family, spec.variant, spec.default_dtype, spec.text_len, spec.weights_variant) == \
               (family, variant, dtype, text_len, file_variant)
        assert spec.source == str(path)
    assert ("guidance" in spec.input_axes()) == (variant == "dev")


def test_real_width_folder_loads_in_the_asked_dtype_and_runs_patched(real):
    spec = te.models.get(str(real["dev"]))
    model = spec.load(torch.bfloat16)
    assert model.config.num_attention_heads * model.config.attention_head_dim == 3072
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert (len(model.transformer_blocks), len(model.single_transformer_blocks)) == (1, 2)
    inputs = spec.sample_inputs(height=256, width=256, dtype=torch.bfloat16, smooth=True)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :32]
    inputs["txt_ids"] = inputs["txt_ids"][:32]
    base = run(model, inputs)
    te.apply_toma(model, te.ToMAConfig(blocks=("*",)))
    merged = run(model, inputs)
    assert base.shape == merged.shape == (1, 256, 64) and torch.isfinite(merged).all()
    assert 0 < ((merged.float() - base.float()).norm() / base.float().norm()).item() < 1


def test_hub_id_in_the_local_cache(real, tmp_path, monkeypatch):
    """A hub id resolves through the Hugging Face cache layout (refs/main -> snapshots/<rev>), offline."""
    in_hub_cache(real["schnell"], "someone/flux-cut", tmp_path, monkeypatch)
    spec = te.models.get("someone/flux-cut")
    assert (spec.name, spec.hub_id, spec.variant) == ("someone/flux-cut", "someone/flux-cut", "schnell")
    assert spec.source.endswith("0123abc")
    with pytest.raises(ModelNotAvailable, match="not in the local Hugging Face cache.*huggingface-cli download"):
        te.models.get("someone/not-downloaded")


def test_refiner_like_unet_is_detected_and_conditioned_with_five_time_ids(tmp_path):
    from diffusers import UNet2DConditionModel

    from toma_export.families.sdxl import TINY

    config = dict(TINY, block_out_channels=(32, 64, 64, 64), attention_head_dim=(2, 4, 4, 4),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 2, 1), projection_class_embeddings_input_dim=64 + 5 * 8)
    torch.manual_seed(0)
    UNet2DConditionModel(**config).save_pretrained(tmp_path / "unet")
    spec = te.models.get(str(tmp_path / "unet"))             # bare folder: told by its added-condition width
    assert (spec.variant, spec.time_ids, spec.cell_multiple) == ("refiner", 5, 8)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLImg2ImgPipeline",
                                                           "requires_aesthetics_score": False}))
    assert te.models.get(str(tmp_path)).variant == "base"   # the pipeline's own word wins
    model = spec.load()
    inputs = spec.sample_inputs(height=256, width=256)
    assert inputs["added_cond_kwargs"]["time_ids"].shape == (1, 5)
    base = run(model, inputs)
    te.apply_toma(model)
    assert torch.isfinite(run(model, inputs)).all() and base.shape == (1, 4, 32, 32)


def test_folders_that_cannot_load_get_one_line(real, tmp_path):
    bare = tmp_path / "no-weights"
    bare.mkdir()
    shutil.copy(real["dev"] / "transformer" / "config.json", bare)
    with pytest.raises(ModelNotAvailable, match="config.json but no weights"):
        te.models.get(str(bare))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(UsageError, match="SD3Transformer2DModel, an architecture toma-export does not support"):
        te.models.get(str(other))
    mixed = tmp_path / "mixed"                             # dev's config, schnell's weights (no guidance embedder)
    shutil.copytree(real["schnell"] / "transformer", mixed)
    shutil.copy(real["dev"] / "transformer" / "config.json", mixed)
    with pytest.raises(ModelNotAvailable, match="do not load with its config.json") as err:
        te.models.get(str(mixed)).load(torch.bfloat16)
    assert "\n" not in str(err.value)
    with pytest.raises(ModelNotAvailable, match="do not load with its config.json") as err:
        te.models.get(str(mixed)).weight_source()              # what export opens before it traces
    assert "weights missing (e.g. single_transformer_blocks.1.attn.norm_k.weight)" in str(err.value)


def test_a_folder_drawn_tensor_by_tensor_is_sharded_as_the_hub_shards(tmp_path):
    """real_configs.write_streamed (the full FLUX.1-dev does not fit in memory to be saved whole): shards
    named and indexed as diffusers writes them, detected as FLUX.1-dev in bf16, and every weight the
    configuration has is there for an export to stream."""
    folder = real_configs.write_streamed("flux-dev", tmp_path / "dev", blocks=(1, 1), shard_bytes=300 << 20)
    net = folder / "transformer"
    index = json.loads((net / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(net.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert not list(net.glob(".shard-*"))
    spec = te.models.get(str(folder))
    assert (spec.family, spec.variant, spec.weights_dtype) == ("flux", "dev", "bf16")
    skeleton = spec.skeleton().state_dict()
    assert sorted(spec.weight_source().keys()) == sorted(index["weight_map"]) == sorted(skeleton)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in skeleton.values())


def test_default_split_on_the_real_depths():
    """The official split (first 5 of 19 double and 5 of 38 single blocks unmerged) and SDXL's 64x64 level,
    on the real configurations built on the meta device (no weights)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    with torch.device("meta"):
        flux = FluxTransformer2DModel(**real_configs.FLUX_DEV)
        unet = UNet2DConditionModel(**real_configs.SDXL_BASE)
    blocks = te.apply_toma(flux).blocks
    assert len([b for b in blocks if b.startswith("transformer_blocks.")]) == 14
    assert len([b for b in blocks if b.startswith("single_transformer_blocks.")]) == 33
    assert "transformer_blocks.4" not in blocks and "transformer_blocks.5" in blocks
    blocks = te.apply_toma(unet).blocks
    assert len(blocks) == 4 + 6          # down_blocks.1 (2 x depth 2) and up_blocks.1 (3 x depth 2)
    assert all(b.startswith(("down_blocks.1.", "up_blocks.1.")) for b in blocks)


def test_schnell_exports_in_its_own_dtype_and_text_length_at_a_size_outside_the_profile(real, tmp_path, cli_here):
    """Defects 8 and 9: no --dtype and no --text-len -> the folder's bf16 and schnell's 256 tokens; a static
    256x256 export lies below FLUX's dynamic range (512..1536) and is still allowed."""
    res = cli_here("export", "--model", real["schnell"], "--height", "256", "--width", "256", "--output-dir",
                   tmp_path, "--json")
    assert res.returncode == 0, res.stderr
    meta = json.loads(res.stdout)
    assert (meta["dtype"], meta["text_len"], meta["variant"], meta["height"]) == ("bf16", 256, "schnell", 256)
    text = next(i for i in meta["inputs"] if i["name"] == "encoder_hidden_states")
    assert text["shape"] == [1, 256, 4096] and text["dtype"] == "bfloat16"
    res = cli_here("export", "--model", real["schnell"], "--height", "256", "--width", "256", "--text-len", "64",
                   "--output-dir", tmp_path, "--json")
    assert res.returncode == 0, res.stderr
    meta64 = json.loads(res.stdout)
    assert meta64["text_len"] == 64 and meta64["key"] != meta["key"]
    res = cli_here("export", "--model", str(real["schnell"]), "--text-len", "0", "--output-dir", str(tmp_path))
    assert res.returncode == 2 and res.stderr.strip() == "toma-export: error: --text-len must be >= 1 token, got 0"


def test_real_width_onnx_parity_with_external_data(real, tmp_path):
    """FLUX.1-dev at its real width (1+2 blocks, fp32: 2.7 GB, so the weights go to external data) against
    the PyTorch reference in ONNX Runtime, with destinations forced equal."""
    env = dict(os.environ)
    res = cli("export", "--model", str(real["dev"]), "--height", "256", "--width", "256", "--dtype", "fp32",
              "--text-len", "32", "--output-dir", str(tmp_path), "--json", env=env)
    assert res.returncode == 0, res.stderr
    meta = json.loads(res.stdout)
    assert meta["external_data"] and (tmp_path / "onnx").is_dir()
    res = cli("validate", "--model", str(real["dev"]), "--onnx", meta["onnx"], "--json", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["passed"] and report["dtype"] == "fp32"
    step = next(c for c in report["comparisons"] if c["backends"][1] == "onnxruntime")
    assert step["size"] == "256x256" and 0 < step["max_abs"] <= step["tolerance"] and step["cosine"] > 0.999


def test_the_large_run_extrapolates_full_flux_linearly_in_parameters():
    """scripts/real_models.py (make test-large): a least-squares line through the measured FLUX series."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "real_models.py"
    spec = importlib.util.spec_from_file_location("real_models_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    runs = [dict(model="flux-dev", label=f"{p}", params_b=p, folder_gib=2 * p, export=dict(ok=True, seconds=10 + 20 * p,
                                                                         peak_rss_gib=1 + 3 * p, gib=2 * p))
            for p in (0.5, 1.0, 2.0)]
    full = script.extrapolate(runs)
    assert full["params_b"] == pytest.approx(11.9, abs=0.01)
    assert full["export_s"] == pytest.approx(10 + 20 * 11.90, abs=0.2)
    assert full["export_rss_gib"] == pytest.approx(1 + 3 * 11.90, abs=0.2) and full["onnx_gib"] == pytest.approx(23.8, abs=0.1)
    assert script.extrapolate(runs[:1]) is None                  # one point fixes no line


def test_generate_names_what_a_network_only_folder_lacks(real, cli_here):
    """export, build and validate need only the network; generate needs the pipeline around it."""
    res = cli_here("generate", "--model", str(real["schnell"] / "transformer"), "--prompt", "a fox", "--out", "x.png")
    assert res.returncode == 2 and "holds only the flux network" in res.stderr and "Traceback" not in res.stderr
    res = cli_here("generate", "--model", str(real["schnell"]), "--prompt", "a fox", "--out", "x.png")
    assert res.returncode == 2 and "lacks text_encoder, text_encoder_2, tokenizer" in res.stderr


def test_validate_defaults_to_the_weights_dtype_where_the_backends_run_it(real):
    """Defect 9: a bf16 FLUX validates in bf16 (not a doubled fp32 copy) where the candidates can run it;
    ONNX Runtime's CPU provider cannot, so there it is fp32 and the reason is given."""
    from toma_export.parity.validate import ValidateOptions, _default_dtype

    spec = te.models.get(str(real["schnell"]))
    assert _default_dtype(spec, ValidateOptions(backends=("torch",)))[0] == "bf16"
    dtype, why = _default_dtype(spec, ValidateOptions(backends=("torch", "onnxruntime")))
    assert dtype == "fp32" and "--dtype fp16" in why
    assert _default_dtype(te.models.get(str(real["sdxl"])), ValidateOptions())[0] == "fp16"
    assert _default_dtype(te.models.get("flux-tiny"), ValidateOptions())[0] == "fp32"


def test_an_export_key_changes_with_the_folders_contents(real, tmp_path):
    """The same path with other weights or another depth is exported again, never served from the cache."""
    from toma_export.onnx.export import ExportOptions, _plan

    folder = shutil.copytree(real["schnell"], tmp_path / "model")
    key = _plan(str(folder), None, tmp_path / "onnx", ExportOptions(height=256, width=256))[3]
    assert _plan(str(folder), None, tmp_path / "onnx", ExportOptions(height=256, width=256))[3] == key
    shutil.rmtree(folder)
    real_configs.write("flux-schnell", folder, blocks=(1, 2))
    assert _plan(str(folder), None, tmp_path / "onnx", ExportOptions(height=256, width=256))[3] != key


@pytest.mark.parametrize("name,cut,size,kind,outputs", [
    ("sdxl-controlnet-canny", dict(transformer_depths=(1, 1, 1)), 256, "SdxlControlNetSpec", 10),
    ("flux-controlnet-union", dict(blocks=(1, 1)), 256, "FluxControlNetSpec", 2),
    ("flux-canny-dev", dict(blocks=(1, 1)), 256, "FluxSpec", 1),
])
def test_real_controlnet_configs_are_detected_and_export_with_their_peak(tmp_path, cli_here, name, cut, size, kind,
                                                                         outputs):
    """The real SDXL ControlNet canny, FLUX.1 ControlNet (Union: 10 modes) and FLUX.1-Canny-dev (128 input
    channels) configurations at real width, cut in depth, random weights in the hub's dtype: detected from the
    folder, exported alone in that dtype, the export's peak memory in its JSON."""
    folder = real_configs.write(name, tmp_path / name, **cut)
    spec = te.models.get(str(folder))
    assert type(spec).__name__ == kind
    res = cli_here("export", "--model", folder, "--height", str(size), "--width", str(size), "--text-len", "32",
                   "--output-dir", tmp_path / "out", "--json")
    assert res.returncode == 0, res.stderr
    meta = json.loads(res.stdout)
    names = [i["name"] for i in meta["inputs"]]
    assert len([o for o in meta["outputs"] if not o["name"].startswith("toma")]) == outputs
    assert meta["dtype"] == {"sdxl": "fp16", "flux": "bf16"}[spec.family] and 0 < meta["peak_rss_gb"] < 8
    if name == "flux-canny-dev":
        assert spec.pipeline_class == "FluxControlPipeline" and spec.variant == "dev-control"
        assert next(i for i in meta["inputs"] if i["name"] == "hidden_states")["shape"][-1] == 128
        assert next(o for o in meta["outputs"] if o["name"] == "noise_pred")["shape"][-1] == 64
    else:
        assert "controlnet_cond" in names and "conditioning_scale" in names and meta["residuals"]
        assert ("controlnet_mode" in names) == (name == "flux-controlnet-union")
