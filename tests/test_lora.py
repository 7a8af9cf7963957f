"""Weights as data: LoRAs and fine-tunes change an export's weights file, never its graph.

Real layers: diffusers' `lora_state_dict` converters read every file; diffusers' `load_lora_weights` +
`fuse_lora` (peft underneath) is the reference the fusion is held to; torch.onnx traces, ONNX Runtime runs.
The kohya files are written by hand (kohya's trainer is not a package), in the key format diffusers reads.
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch
from loras import kohya_lora, peft_lora

import toma_export as te
from toma_export import lora
from toma_export.onnx import ExportOptions, export
from toma_export.onnx.weights import arrays
from toma_export.weightfiles import WeightSource

quiet = dict(progress=lambda m: None)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return dict(flux_a=peft_lora("flux-tiny", d / "flux_a", seed=1),
                flux_b=peft_lora("flux-tiny", d / "flux_b", seed=2, rank=2, alpha=4, targets=["to_v", "ff.net.0.proj"]),
                flux_kohya=kohya_lora("flux-tiny", d / "flux_kohya.safetensors", seed=3),
                sdxl_a=peft_lora("sdxl-tiny", d / "sdxl_a", seed=4),
                sdxl_kohya=kohya_lora("sdxl-tiny", d / "sdxl_kohya.safetensors", seed=5))


def _tensor(source, key):
    raw = bytearray(b"".join(source.chunks(key, torch.float32)))
    return torch.frombuffer(raw, dtype=torch.float32).reshape(source.shapes()[key])


@pytest.mark.parametrize("model,which", [("flux-tiny", ("flux_a",)), ("flux-tiny", ("flux_kohya",)),
                                         ("flux-tiny", ("flux_a", "flux_b", "flux_kohya")),
                                         ("sdxl-tiny", ("sdxl_a",)), ("sdxl-tiny", ("sdxl_kohya",))])
def test_fused_weights_are_what_diffusers_fuses(files, model, which):
    spec = te.models.get(model)
    loras = tuple((str(files[w]), 0.5 + i) for i, w in enumerate(which))
    base = WeightSource.of_module(spec.load())
    ours = lora.fused(base, lora.terms(loras, spec.family, base.shapes(), model), "")
    reference = spec.load()
    lora.load_with_diffusers(reference, spec.family, loras)
    expected = reference.state_dict()
    assert set(expected) == set(ours.keys())            # diffusers' peft layers are gone after fusing
    changed = {k for k in expected if not torch.equal(expected[k], _tensor(base, k))}
    assert changed and changed == set(lora.terms(loras, spec.family, base.shapes(), model))
    for key in expected:
        torch.testing.assert_close(_tensor(ours, key), expected[key], rtol=0, atol=1e-6, msg=key)


def test_bad_loras_are_refused_in_one_line(files, tmp_path, cli_here):
    from safetensors.torch import load_file, save_file

    state = load_file(str(files["flux_a"]))
    mine = "transformer.transformer_blocks.0.attn.to_q."
    nowhere = {k.replace(mine, "transformer.transformer_blocks.7.attn.to_q."): v for k, v in state.items()}
    save_file(nowhere, str(tmp_path / "nowhere.safetensors"))
    narrow = {k: v[:, :32].contiguous() if k == mine + "lora_A.weight" else v
              for k, v in state.items()}
    save_file(narrow, str(tmp_path / "narrow.safetensors"))
    cases = [(files["sdxl_a"], "is for SDXL, but flux-tiny is FLUX"),
             (tmp_path / "nowhere.safetensors", "transformer_blocks.7.attn.to_q matches no weight of flux-tiny"),
             (tmp_path / "narrow.safetensors", "changes a (64, 32) weight but flux-tiny's "
                                               "transformer_blocks.0.attn.to_q.weight is (64, 64)"),
             (tmp_path / "missing.safetensors", "is not a file"),
             (f"{files['flux_a']}:nan", "the scale must be a finite number")]
    for path, message in cases:
        result = cli_here("export", "--model", "flux-tiny", "--output-dir", tmp_path / "out", "--lora", path)
        last = result.stderr.strip().splitlines()[-1]       # argparse's usage lines come first for an option
        assert result.returncode != 0 and message in last and "Traceback" not in result.stderr, result.stderr
    assert not list((tmp_path / "out").glob("onnx/*/model.onnx"))        # refused before anything was written


def test_a_lora_export_reuses_the_graph_and_a_b_a_is_bit_for_bit(files, artifacts, dynamic_export):
    base = dynamic_export("flux-tiny")                  # the shared export: its graph is reused, never traced
    root = artifacts / "onnx"
    a_opts = ExportOptions(dynamic=True, loras=((str(files["flux_a"]), 0.8),))
    messages = []
    a = export("flux-tiny", te.ToMAConfig(), root, a_opts, progress=messages.append)
    assert a["graph_key"] == base["graph_key"] and a["weights"]["key"] != base["weights"]["key"]
    assert not any("tracing" in m for m in messages) and any("no trace" in m for m in messages), messages
    assert a["weights"]["loras"] == [dict(file=str(files["flux_a"]), sha256=lora.LoRA(str(files["flux_a"])).digest(),
                                          scale=0.8)]
    folder_a = a["onnx"].rsplit("/", 1)[0]
    graphs = [onnx.load(m["onnx"], load_external_data=False).graph for m in (base, a)]
    assert graphs[0].node == graphs[1].node and graphs[0].input == graphs[1].input   # the same graph
    before, after = arrays(base["onnx"]), arrays(a["onnx"])
    changed = {k for k in before if not (before[k] == after[k]).all()}
    spec = te.models.get("flux-tiny")
    assert changed == set(lora.terms(a_opts.loras, "flux", WeightSource.of_module(spec.load()).shapes(), "flux-tiny"))

    data_a = open(f"{folder_a}/model.onnx.data", "rb").read()
    b = export("flux-tiny", te.ToMAConfig(), root, ExportOptions(dynamic=True, loras=((str(files["flux_b"]), 1.0),)),
               **quiet)
    assert b["graph_key"] == a["graph_key"] and b["key"] != a["key"]
    shutil.rmtree(folder_a)                              # A again, after B: fused from the base, not from B
    again = export("flux-tiny", te.ToMAConfig(), root, a_opts, **quiet)
    assert again["key"] == a["key"]
    assert open(f"{folder_a}/model.onnx.data", "rb").read() == data_a


def test_validate_holds_a_lora_export_to_diffusers_own_loading(files, artifacts, dynamic_export):
    from toma_export.errors import UsageError
    from toma_export.parity import ValidateOptions, validate

    loras = ((str(files["flux_a"]), 0.8),)
    meta = export("flux-tiny", te.ToMAConfig(), artifacts / "onnx", ExportOptions(dynamic=True, loras=loras), **quiet)
    report = validate("flux-tiny", te.ToMAConfig(), ValidateOptions(onnx=meta["onnx"]), **quiet)
    assert report["loras"] == [dict(file=loras[0][0], scale=0.8)]          # taken from the file's toma.json
    assert report["passed"] and report["comparisons"], report
    with pytest.raises(UsageError, match="was exported with no LoRA"):
        validate("flux-tiny", te.ToMAConfig(), ValidateOptions(onnx=dynamic_export("flux-tiny")["onnx"], loras=loras),
                 **quiet)
    # the LoRA moves the output well beyond the tolerance the comparison passed at
    spec = te.models.get("flux-tiny")
    plain, with_lora = spec.load(), spec.load()
    lora.load_with_diffusers(with_lora, "flux", loras)
    inputs = spec.sample_inputs(dtype=torch.float32, smooth=True)
    out = [m(**inputs, return_dict=False)[0] for m in (plain, with_lora)]
    assert ((out[0] - out[1]).norm() / out[0].norm()).item() > 1e-2


def test_a_fine_tune_reuses_the_graph_and_links_its_weights(tmp_path):
    """Two folders of one architecture (a base and its fine-tune): the second export reuses the first's graph.
    With --link-weights the graph points into the folder's own safetensors file, hard-linked, and ONNX Runtime
    runs it (validated against PyTorch); without, every weight is copied into model.onnx.data."""
    from toma_export.parity import ValidateOptions, validate

    spec = te.models.get("flux-tiny")
    folders = []
    for seed in (0, 1):
        folder = tmp_path / f"tune{seed}"
        spec.load(seed=seed).save_pretrained(folder)
        folders.append(str(folder))
    options = ExportOptions(height=128, width=128)
    first = export(folders[0], te.ToMAConfig(), tmp_path / "onnx", options, **quiet)
    assert first["weights"]["linked"] == [] and first["weights"]["written"] == first["weights"]["bytes"]
    assert len(onnx.load(first["onnx"]).graph.initializer) == first["weights"]["tensors"]   # onnx.load reads it
    messages = []
    second = export(folders[1], te.ToMAConfig(), tmp_path / "onnx", replace(options, link_weights=True),
                    progress=messages.append)
    assert second["graph_key"] == first["graph_key"] and second["graph_from"] == first["onnx"].split("/")[-2]
    assert second["model"] == folders[1] and second["weights"]["base"] == folders[1]
    assert not any("tracing" in m for m in messages)
    stored = tmp_path / "tune1" / "diffusion_pytorch_model.safetensors"
    linked = Path(second["onnx"]).with_name(stored.name)
    assert second["weights"]["written"] == 0 and second["weights"]["linked"] == [str(stored)]
    assert linked.stat().st_ino == stored.stat().st_ino                        # a hard link, not a copy
    tuned = arrays(second["onnx"])
    weights = te.models.get(folders[1]).load().state_dict()
    assert set(tuned) == set(weights)
    for key, value in weights.items():
        assert (tuned[key] == value.numpy()).all(), key
    report = validate(folders[1], te.ToMAConfig(), ValidateOptions(onnx=second["onnx"], backends=("onnxruntime",)),
                      **quiet)
    assert report["passed"] and report["comparisons"], report
    trt = pytest.importorskip("tensorrt_rtx")            # TensorRT-RTX's parser reads the linked file too
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(second["onnx"]), [str(parser.get_error(i)) for i in range(parser.num_errors)]
