"""ControlNets: each its own graph, the network's graph taking their residuals, both families, ToMA in both.
Real layers: diffusers' ControlNetModel / FluxControlNetModel and networks and their ControlNet pipelines,
torch.onnx, ONNX Runtime, TensorRT-RTX builds. The tiny ControlNets are the trained ones the package ships; other
ControlNets of their architecture are untrained (made from a random network), which is all a swap needs."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import toma_export as te
from toma_export.errors import UsageError
from toma_export.onnx import ExportOptions, ToMAGraph
from toma_export.onnx.export import export_controlled
from toma_export.toma import ToMAConfig, apply_toma

SIZE = 128                      # both tiny families' smallest size: static exports there are the quickest
OPTIONS = ExportOptions(height=SIZE, width=SIZE)
PAIRS = {"sdxl": ("sdxl-tiny", "sdxl-tiny-controlnet"), "flux": ("flux-tiny", "flux-tiny-controlnet")}


@pytest.fixture(scope="module")
def exports(artifacts):
    """Per family: the tiny ControlNet's graph and the network taking its residuals, ToMA in both."""
    return {family: export_controlled(net, [cn], ToMAConfig(), artifacts / "onnx", OPTIONS, progress=lambda m: None)
            for family, (net, cn) in PAIRS.items()}


@pytest.fixture(scope="module")
def second(tmp_path_factory):
    """Another FLUX ControlNet of the tiny architecture, as a diffusers folder: other weights (untrained, made from a
    random network at seed 1)."""
    folder = tmp_path_factory.mktemp("controlnets") / "flux-second"
    te.models.get("flux-tiny-controlnet").load(seed=1, trained=False).save_pretrained(folder)
    return str(folder)


def eager(name: str, control: tuple = (), seed: int = 0, config=ToMAConfig()):
    """The graph as eager PyTorch (the reference) and its sample inputs at SIZE."""
    spec = te.models.get(name).with_control(control)
    model = spec.load(seed=seed)
    graph = ToMAGraph(model, spec, apply_toma(model, config) if config else None).eval()
    return graph, spec.graph_inputs(height=SIZE, width=SIZE, smooth=True)


def run_onnx(meta: dict, feeds: dict) -> list:
    session = ort.InferenceSession(meta["onnx"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})


@pytest.mark.parametrize("family", PAIRS)
def test_controlnet_and_the_network_taking_its_residuals_match_torch(exports, family):
    """The ControlNet's graph, then the network's fed its residuals, in ONNX Runtime against eager PyTorch; the
    ToMA destinations each graph selects are the same."""
    net, cn = PAIRS[family]
    meta, (cn_meta,) = exports[family]["network"], exports[family]["controlnets"]
    assert cn_meta["residuals"] == meta["control"] and cn_meta["toma"]["selection_nodes"] > 0
    graph, x = eager(cn)
    feeds = {**x, **graph.sample_toma_inputs(x)}
    ref = graph(*feeds.values())
    got = run_onnx(cn_meta, feeds)
    residuals = {}
    for name, a, b in zip(graph.output_names, ref, got):
        if name.startswith("toma_dst_out"):
            assert np.array_equal(a.numpy(), b), name
        else:
            assert a.abs().max() > 1e-3, f"{name} is ~0: a ControlNet that adds nothing would prove nothing"
            assert np.abs(a.numpy() - b).max() <= 1e-4 * max(1.0, float(a.abs().max())), name
            residuals[name] = a
    assert list(residuals) == [i["name"] for i in meta["inputs"] if i["name"].startswith("control_")]

    graph, x = eager(net, tuple(meta["control"]))
    x.update(residuals)
    feeds = {**x, **graph.sample_toma_inputs(x)}
    ref = graph(*feeds.values())
    got = run_onnx(meta, feeds)
    assert np.abs(ref[0].numpy() - got[0]).max() <= 1e-4 * max(1.0, float(ref[0].abs().max()))
    unsteered = graph(*{**feeds, **{k: torch.zeros_like(v) for k, v in residuals.items()}}.values())
    assert (ref[0] - unsteered[0]).abs().max() > 1e-2, "the residuals changed nothing"


def test_flux_residuals_are_added_once_after_each_block_with_diffusers_interval_rule():
    """The merged blocks never see a residual inside their attention: the graph's output equals the same patched
    transformer with no ControlNet inputs and each residual added by a hook after its block (2 double residuals
    over 4 double blocks: blocks 0-1 get the first; 4 single over 8: two blocks each), destinations included."""
    spec = te.models.get("flux-tiny").with_control(("flux", 2, 4, 0))
    model = spec.load()
    config = ToMAConfig(blocks=("*",))            # every block merged, so every residual meets a merged block
    graph = ToMAGraph(model, spec, apply_toma(model, config)).eval()
    x = spec.graph_inputs(height=SIZE, width=SIZE, smooth=True)
    toma = graph.sample_toma_inputs(x)
    steered = graph(*x.values(), *toma.values())

    plain = te.models.get("flux-tiny")
    hooks = []
    for group, names in (("transformer_blocks", ["control_block.0", "control_block.1"]),
                         ("single_transformer_blocks", [f"control_single.{i}" for i in range(4)])):
        for i, block in enumerate(getattr(model, group)):
            r = x[names[i // 2]].flatten(1, 2)

            def add(module, args, out, r=r):
                return out[0], out[1] + r
            hooks.append(block.register_forward_hook(add))
    try:
        reference = ToMAGraph(model, plain, graph.report).eval()(*[x[n] for n in plain.input_axes()], *toma.values())
    finally:
        for h in hooks:
            h.remove()
    for a, b in zip(steered, reference):
        assert torch.equal(a, b)


def test_toma_patches_the_controlnets_own_blocks(tiny):
    for name, groups in (("sdxl-tiny-controlnet", {"down_blocks.1.attentions.0", "down_blocks.1.attentions.1"}),
                         ("flux-tiny-controlnet", {"transformer_blocks", "single_transformer_blocks"})):
        model = te.models.get(name).load()
        report = apply_toma(model, ToMAConfig())
        assert set(report.groups) == groups and 0 < len(report.blocks) < report.total


def test_a_controlnet_of_the_same_architecture_swaps_in_without_a_trace(exports, artifacts, second):
    """Another ControlNet (a folder, other weights) reuses the traced ControlNet graph and the network's export;
    its residuals are its own."""
    folder = second
    spec = te.models.get(str(folder))
    assert spec.residual_layout() == ("flux", 2, 4, 0) and spec.family == "flux"
    said = []
    both = export_controlled("flux-tiny", [str(folder)], ToMAConfig(), artifacts / "onnx", OPTIONS, progress=said.append)
    first = exports["flux"]
    (meta,) = both["controlnets"]
    assert meta["graph_from"] == first["controlnets"][0]["onnx"].split("/")[-2]
    assert both["network"]["onnx"] == first["network"]["onnx"]
    assert not any("tracing" in line for line in said), said
    graph, x = eager("flux-tiny-controlnet")
    feeds = {**x, **graph.sample_toma_inputs(x)}
    mine, theirs = run_onnx(meta, feeds), run_onnx(first["controlnets"][0], feeds)
    assert np.abs(mine[0] - theirs[0]).max() > 1e-2
    reference = eager(str(folder))[0](*feeds.values())
    assert np.abs(reference[0].numpy() - mine[0]).max() < 1e-4


def test_two_controlnets_export_once_each_for_one_network(exports, artifacts, tmp_path, cli_here):
    folder = tmp_path / "second"
    te.models.get("sdxl-tiny-controlnet").load(seed=2, trained=False).save_pretrained(folder)
    res = cli_here("export", "--model", "sdxl-tiny", "--height", str(SIZE), "--width", str(SIZE), "--controlnet",
                   "sdxl-tiny-controlnet:0.5", "--controlnet", f"{folder}:1.2", "--output-dir", artifacts, "--json")
    assert res.returncode == 0, res.stderr
    meta = json.loads(res.stdout)
    assert meta["onnx"] == exports["sdxl"]["network"]["onnx"] and meta["control"] == ["sdxl", 9]
    assert [m["model"] for m in meta["controlnets"]] == ["sdxl-tiny-controlnet", str(folder)]
    assert meta["controlnets"][1]["graph_from"] and meta["peak_rss_gb"] > 0


@pytest.mark.parametrize("args,message", [
    (("--model", "sdxl-tiny", "--controlnet", "flux-tiny-controlnet"),
     "flux-tiny-controlnet is a flux ControlNet; sdxl-tiny is a sdxl network"),
    (("--model", "flux-tiny", "--controlnet", "flux-tiny"), "flux-tiny is not a ControlNet (a flux network)"),
    (("--model", "flux-tiny", "--controlnet", "flux-tiny-controlnet", "--cache", "fbcache:0.1"),
     "First-Block Cache does not split a network that takes ControlNet residuals yet"),
    (("--model", "flux-tiny", "--controlnet", "flux-tiny-controlnet", "--quantize", "int8"),
     "8-bit exports with ControlNets are not supported yet"),
    (("--model", "flux-tiny", "--controlnet", ":2"), "--controlnet needs a name or folder before :SCALE"),
])
def test_refusals_before_any_work(cli_here, tmp_path, args, message):
    res = cli_here("export", *args, "--output-dir", tmp_path)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "onnx").exists() or not any((tmp_path / "onnx").iterdir())


@pytest.mark.parametrize("args,message", [
    (("--model", "flux-tiny", "--controlnet", "flux-tiny-controlnet", "--quantize", "int8"),
     "8-bit exports with ControlNets are not supported yet"),
    (("--model", "flux-tiny", "--controlnet", "flux-tiny-controlnet", "--cache", "fbcache:0.1"),
     "First-Block Cache does not split a network that takes ControlNet residuals yet"),
    (("--model", "sdxl-tiny", "--controlnet", "sdxl-tiny-controlnet", "--save-reference", "r.npz"),
     "validate --controlnet exports and checks the ControlNet graphs and the network itself; drop --save-reference"),
    (("--model", "sdxl-tiny", "--controlnet", "flux-tiny-controlnet"),
     "flux-tiny-controlnet is a flux ControlNet; sdxl-tiny is a sdxl network"),
])
def test_validate_refusals_before_any_work(cli_here, tmp_path, args, message):
    res = cli_here("validate", *args, "--output-dir", tmp_path)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("family", PAIRS)
def test_validate_checks_each_graph_and_the_chain_over_a_loop(exports, artifacts, cli_here, family):
    """validate --controlnet with ToMA in both graphs: the ControlNet graph on the reference's inputs, the network
    fed the reference's residuals, and the chain, one step and a 3-step loop, ONNX Runtime against the fp32 PyTorch
    pipeline, reusing the module's exports (static 128 px, batch 1)."""
    net, cn = PAIRS[family]
    res = cli_here("validate", "--model", net, "--controlnet", f"{cn}:0.7", "--sizes", f"{SIZE}x{SIZE}", "--batch",
                   "1", "--steps", "3", "--output-dir", artifacts, "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert "[export 2/4]" not in res.stderr, "validate exported again instead of reusing the module's exports"
    assert report["passed"] and report["controlnets"] == [dict(name=cn, scale=0.7, toma=True)]
    assert report["onnx"] == [exports[family]["controlnets"][0]["onnx"], exports[family]["network"]["onnx"]]
    steps = {c["graph"]: c for c in report["comparisons"] if c["kind"] == "step"}
    assert set(steps) == {cn, net, "chain"} and steps[cn]["output"].startswith("control_")
    assert [c["step"] for c in report["comparisons"] if c["kind"] == "loop"] == [0, 1, 2]
    assert all(c["cosine"] > 0.9999 and c["scale"] > 0 for c in report["comparisons"])
    (selection,) = report["selection"]            # the network's groups and the ControlNet's, under c0:
    assert any(g.startswith("c0:") for g in selection["groups"]) and selection["passed"]


def test_validate_without_toma_runs_the_half_precision_pipeline(cli_here, tmp_path):
    """--no-toma, PyTorch fp16 as the candidate (no export): the chain without ToMA, judged at fp16's tolerance."""
    res = cli_here("validate", "--model", "sdxl-tiny", "--controlnet", "sdxl-tiny-controlnet", "--no-toma",
                   "--backends", "torch", "--dtype", "fp16", "--sizes", f"{SIZE}x{SIZE}", "--steps", "2", "--json",
                   "--output-dir", tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["toma"] is None and report["controlnets"][0]["toma"] is False and not report["selection"]
    assert {c["backends"][1] for c in report["comparisons"]} == {"torch-fp16"}
    assert 0 < max(c["max_abs"] for c in report["comparisons"]) <= min(c["tolerance"] for c in report["comparisons"])


def test_bisect_names_the_controlnet_graph_that_diverges(exports, artifacts, tmp_path, monkeypatch):
    """One weight of the ControlNet's exported file perturbed (a copy; the real export and reference otherwise):
    its graph fails, the network fed the reference's residuals still passes, and --bisect names the ControlNet
    and the block inside it."""
    import shutil

    import onnx

    from toma_export.parity import controlnet as chain
    from toma_export.parity.validate import ValidateOptions, validate

    made = exports["sdxl"]
    folder = tmp_path / "corrupt"
    shutil.copytree(made["controlnets"][0]["onnx"].rsplit("/", 1)[0], folder)
    model = onnx.load(folder / "model.onnx")
    name = "down_blocks.1.attentions.1.transformer_blocks.0.ff.net.2.bias"
    weight = next(t for t in model.graph.initializer if t.name.endswith(name))
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) + 1.0, weight.name))
    onnx.save(model, folder / "model.onnx")
    corrupt = dict(made, controlnets=[dict(made["controlnets"][0], onnx=str(folder / "model.onnx"))])
    monkeypatch.setattr(chain, "export_controlled", lambda *a, **k: corrupt)
    report = validate("sdxl-tiny", ToMAConfig(), ValidateOptions(
        backends=("onnxruntime",), sizes=((SIZE, SIZE),), batch=1, bisect=True, output_dir=str(artifacts),
        controlnets=(("sdxl-tiny-controlnet", 1.0),)), progress=lambda m: None)
    verdict = {c["graph"]: c["passed"] for c in report["comparisons"]}
    assert verdict == {"sdxl-tiny-controlnet": False, "sdxl-tiny": True, "chain": False}
    (bisect,) = report["bisect"]
    assert bisect["first_failing_graph"] == "sdxl-tiny-controlnet"
    assert bisect["first_failing_block"].startswith("down_blocks.1.attentions.1.")      # at block granularity


def test_a_controlnet_that_does_not_fit_its_network_is_named(tmp_path):
    """A FLUX ControlNet of another text width, and one in the XLabs layout (pixel hint block), are refused."""
    from diffusers.models.controlnets.controlnet_flux import FluxControlNetModel

    from toma_export.families.controlnet import init_config
    from toma_export.families.flux import TINY

    wide = tmp_path / "wide"
    FluxControlNetModel(**dict(init_config(FluxControlNetModel, TINY), num_layers=1, num_single_layers=1,
                               joint_attention_dim=48)).save_pretrained(wide)
    with pytest.raises(UsageError, match=r"does not fit flux-tiny: its encoder_hidden_states is \[1, 16, 48\]"):
        export_controlled("flux-tiny", [str(wide)], ToMAConfig(), tmp_path, OPTIONS)
    xlabs = tmp_path / "xlabs"
    FluxControlNetModel(**dict(init_config(FluxControlNetModel, TINY), num_layers=1, num_single_layers=0,
                               conditioning_embedding_channels=16)).save_pretrained(xlabs)
    with pytest.raises(UsageError, match="pixel hint block"):
        export_controlled("flux-tiny", [str(xlabs)], ToMAConfig(), tmp_path, OPTIONS)


def test_graphs_refuse_residuals_they_were_not_exported_for():
    spec = te.models.get("sdxl-tiny")
    x = spec.sample_inputs(height=SIZE, width=SIZE)
    residuals = [torch.zeros(1)] * 9
    with pytest.raises(UsageError, match="takes no ControlNet residuals: export it with --controlnet"):
        spec.served_call({}, x["sample"], x["timestep"], x["encoder_hidden_states"],
                         added_cond_kwargs=x["added_cond_kwargs"], down_block_additional_residuals=residuals,
                         mid_block_additional_residual=torch.zeros(1))
    with pytest.raises(UsageError, match="takes ControlNet residuals: serve it with its ControlNets"):
        spec.with_control(("sdxl", 9)).served_call({}, x["sample"], x["timestep"], x["encoder_hidden_states"],
                                                   added_cond_kwargs=x["added_cond_kwargs"])
    with pytest.raises(UsageError, match="takes a ControlNet with 9 down residuals"):
        spec.with_control(("sdxl", 12))


STEPS = 4


def control_image(family: str):
    from toma_export import shapes

    return shapes.sample(0, 3, size=SIZE).control()


def latents(pipe, family: str, controls, seed: int = 2, modes=()):
    """The pipeline's last latents for a shapes caption, guidance 1 (no CFG batch: the exports' batch 1)."""
    spec = te.models.get(PAIRS[family][0])
    pipe.set_progress_bar_config(disable=True)
    return pipe("a blue triangle on a white background", height=SIZE, width=SIZE, num_inference_steps=STEPS,
                guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(seed),
                **spec.control_kwargs([image for image, _ in controls], [scale for _, scale in controls], modes),
                **spec.pipeline_kwargs()).images


def served(family: str, metas: list, config=ToMAConfig()):
    from toma_export.serve import load_network, load_pipeline
    from toma_export.serve.pipeline import attach

    net, _ = PAIRS[family]
    nets = [load_network(m["onnx"]) for m in metas["controlnets"]]
    pipe = load_pipeline(net, network=False, controlnets=nets)
    attach(pipe, load_network(metas["network"]["onnx"]))
    return pipe, nets


def pytorch(family: str, controlnets: list, config=ToMAConfig()):
    from toma_export.serve import load_pipeline

    net, _ = PAIRS[family]
    modules = []
    for name in controlnets:
        module = te.models.get(name).load()
        apply_toma(module, config)
        modules.append(module)
    pipe = load_pipeline(net, controlnets=modules)
    apply_toma(pipe, config)
    return pipe


@pytest.mark.parametrize("family", PAIRS)
def test_served_controlnet_pipeline_matches_the_pytorch_one(exports, family):
    """diffusers' ControlNet pipeline (it resizes and encodes the control image) with the served ControlNet and
    network in ONNX Runtime, against the same pipeline on PyTorch with ToMA patched into both, over a loop; the
    control changes the result."""
    from toma_export.parity.metrics import compare, tolerance

    image = control_image(family)
    ref = latents(pytorch(family, [PAIRS[family][1]]), family, [(image, 1.0)])
    pipe, (net,) = served(family, exports[family])
    got = latents(pipe, family, [(image, 1.0)])
    result = compare(ref.numpy(), got.numpy(), *tolerance("loop", "fp32"))
    assert result["passed"], result
    assert net.calls["toma"] == STEPS and net.calls["recompute"] == STEPS
    unsteered = latents(pipe, family, [(image, 0.0)])
    assert (unsteered - got).abs().max() > 1e-2


def test_two_controlnets_at_once_sum_their_residuals(exports, artifacts, second):
    """Two FLUX ControlNets (two weight sets of one graph) served together, against diffusers'
    FluxMultiControlNetModel on PyTorch; each scale counts."""
    from toma_export.parity.metrics import compare, tolerance

    both = export_controlled("flux-tiny", ["flux-tiny-controlnet", second], ToMAConfig(), artifacts / "onnx", OPTIONS,
                             progress=lambda m: None)
    assert both["network"]["onnx"] == exports["flux"]["network"]["onnx"]
    image, other = control_image("flux"), control_image("flux").transpose(0)     # mirrored: another control
    controls = [(image, 0.7), (other, 1.3)]
    ref = latents(pytorch("flux", ["flux-tiny-controlnet", second]), "flux", controls)
    pipe, nets = served("flux", both)
    got = latents(pipe, "flux", controls)
    assert compare(ref.numpy(), got.numpy(), *tolerance("loop", "fp32"))["passed"]
    assert [n.calls["toma"] for n in nets] == [STEPS, STEPS]
    first_only = latents(pipe, "flux", [(image, 0.7), (other, 0.0)])
    assert (first_only - got).abs().max() > 1e-2


@pytest.fixture(scope="module")
def union(tmp_path_factory):
    """A FLUX Union ControlNet (InstantX's Union layout: a mode embedding) of the tiny architecture, 3 modes, as a
    diffusers folder: flux-tiny-controlnet's weights and a mode embedding drawn at seed 3."""
    from diffusers.models.controlnets.controlnet_flux import FluxControlNetModel

    base = te.models.get("flux-tiny-controlnet").load()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = FluxControlNetModel(**{**{k: v for k, v in base.config.items() if not k.startswith("_")}, "num_mode": 3})
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("controlnet_mode_embedder") for k in missing)
    folder = tmp_path_factory.mktemp("controlnets") / "flux-union"
    model.save_pretrained(folder)
    return str(folder)


def test_a_union_controlnet_serves_the_mode_it_is_given(exports, artifacts, union, tmp_path, cli_here):
    """A Union ControlNet's graph takes the mode; served with `control_mode` it matches diffusers' pipeline on
    PyTorch, another mode draws another picture, and generate / export-repo pass `--control-mode` through. The
    network's graph is the one every ControlNet of the layout shares."""
    from toma_export.parity.metrics import compare, tolerance
    from toma_export.serve.generate import Session

    both = export_controlled("flux-tiny", [union], ToMAConfig(), artifacts / "onnx", OPTIONS, progress=lambda m: None)
    assert both["network"]["onnx"] == exports["flux"]["network"]["onnx"]
    assert "controlnet_mode" in {i["name"] for i in both["controlnets"][0]["inputs"]}
    image = control_image("flux")
    ref = latents(pytorch("flux", [union]), "flux", [(image, 1.0)], modes=[2])
    pipe, _ = served("flux", both)
    got = latents(pipe, "flux", [(image, 1.0)], modes=[2])
    assert compare(ref.numpy(), got.numpy(), *tolerance("loop", "fp32"))["passed"]
    assert (latents(pipe, "flux", [(image, 1.0)], modes=[0]) - got).abs().max() > 1e-3
    with pytest.raises(UsageError, match="is a Union ControlNet: give its mode with --control-mode"):
        Session(both["network"]["onnx"], controlnets=[(both["controlnets"][0]["onnx"], None)])

    image_file = tmp_path / "control.png"
    image.save(image_file)
    drawn = {}
    for mode in ("depth", "0"):
        out = tmp_path / f"{mode}.png"
        res = cli_here("generate", "--model", "flux-tiny", "--prompt", "a blue triangle on a white background",
                       "--size", f"{SIZE}x{SIZE}", "--steps", "2", "--guidance", "1", "--controlnet", union,
                       "--control-image", image_file, "--control-mode", mode, "--out", out, "--output-dir", artifacts)
        assert res.returncode == 0 and "tracing" not in res.stderr, res.stderr[-2000:]
        drawn[mode] = out.read_bytes()
    assert drawn["depth"] != drawn["0"]

    repo = tmp_path / "repo"
    res = cli_here("export-repo", "--onnx", both["network"]["onnx"], "--controlnet", union, "--control-mode", "depth",
                   "--out", repo, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["controlnets"][0]["mode"] == 2
    assert 'key: "controlnet_modes"\n  value: { string_value: "2" }' in (repo / "flux-tiny" / "config.pbtxt").read_text()
    res = cli_here("export-repo", "--onnx", both["network"]["onnx"], "--controlnet", union, "--out", tmp_path / "r2")
    assert res.returncode == 2 and "is a Union ControlNet: give its mode" in res.stderr
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("extra,message", [
    (("--controlnet", "UNION", "--control-image", "c.png"), "is a Union ControlNet: give its mode with --control-mode"),
    (("--controlnet", "UNION", "--control-image", "c.png", "--control-mode", "pose"),
     "--control-mode pose for {union}: give a number 0..2 or one of InstantX's names (canny, tile, depth)"),
    (("--controlnet", "UNION", "--controlnet", "flux-tiny-controlnet", "--control-image", "c.png",
      "--control-image", "c.png", "--control-mode", "1"), "2 --controlnet and 1 --control-mode: give one mode per"),
    (("--controlnet", "UNION", "--controlnet", "flux-tiny-controlnet", "--control-image", "c.png",
      "--control-image", "c.png", "--control-mode", "1", "--control-mode", "canny"),
     "--control-mode canny for flux-tiny-controlnet, which is not a Union ControlNet: give 'none'"),
    (("--controlnet", "flux-tiny-controlnet", "--control-image", "c.png", "--control-mode", "canny"),
     "none of the --controlnet given is one: drop --control-mode"),
    (("--control-mode", "1",), "--control-mode goes with --controlnet"),
])
def test_union_modes_are_checked_before_any_work(cli_here, tmp_path, monkeypatch, union, extra, message):
    monkeypatch.chdir(tmp_path)
    control_image("flux").save(tmp_path / "c.png")
    res = cli_here("generate", "--model", "flux-tiny", "--prompt", "a red circle", "--out", "x.png",
                   *[union if a == "UNION" else a for a in extra], "--output-dir", tmp_path / "out")
    assert res.returncode == 2 and message.format(union=union) in res.stderr and "Traceback" not in res.stderr, \
        res.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.png").exists()


def test_generate_draws_with_a_control_image(exports, artifacts, tmp_path, cli_here):
    image = tmp_path / "control.png"
    control_image("sdxl").save(image)
    out = tmp_path / "steered.png"
    res = cli_here("generate", "--model", "sdxl-tiny", "--prompt", "a blue triangle on a white background", "--size",
                   f"{SIZE}x{SIZE}", "--steps", "3", "--guidance", "1", "--controlnet", "sdxl-tiny-controlnet:0.9",
                   "--control-image", image, "--out", out, "--output-dir", artifacts, "--json")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    (cn,) = result["controlnets"]
    assert cn["onnx_or_engine"] == exports["sdxl"]["controlnets"][0]["onnx"] and cn["scale"] == 0.9
    assert cn["calls"]["toma"] == 3 and result["onnx_or_engine"] == exports["sdxl"]["network"]["onnx"]
    from PIL import Image

    with Image.open(out) as drawn:
        assert drawn.size == (SIZE, SIZE)


@pytest.mark.parametrize("extra,message", [
    (("--controlnet", "sdxl-tiny-controlnet"), "1 --controlnet and 0 --control-image: give one control image per"),
    (("--controlnet", "sdxl-tiny-controlnet", "--control-image", "missing.png"), "--control-image missing.png: no such"),
    (("--controlnet", "sdxl-tiny-controlnet", "--control-image", "notes.txt"), "notes.txt is not an image PIL can read"),
    (("--control-image", "notes.txt"), "0 --controlnet and 1 --control-image"),
])
def test_generate_refuses_bad_control_images_before_any_work(cli_here, tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    res = cli_here("generate", "--model", "sdxl-tiny", "--prompt", "a red circle", "--out", "x.png", *extra,
                   "--output-dir", tmp_path / "out")
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.png").exists()


def test_sweep_reports_control_per_ratio(tmp_path):
    """`sweep --controlnet` draws held-out outlines with their captions at each ratio, ToMA in network and
    ControlNet, and adds the judge's control IoU and centroid distance to each row; grid.png shows the controls."""
    from PIL import Image

    from toma_export.quality.sweep import SweepRequest, sweep, write

    result = sweep(SweepRequest(model="sdxl-tiny", ratios=(0.0, 0.5), steps=2, controlnet="sdxl-tiny-controlnet",
                                controls=2), quiet=True)
    rows = result["rows"]
    assert [r["ratio"] for r in rows] == [0.0, 0.5] and all(r["images"] == 2 for r in rows)
    assert all(0 <= r["control_iou"] <= 1 for r in rows) and "control_iou" in result["metric_names"]
    from toma_export import shapes
    from toma_export.quality.judge import CONTROL_SEED

    assert result["jobs"][1][0] == shapes.sample(CONTROL_SEED, 1, SIZE).caption
    files = write(result, tmp_path)
    with Image.open(files["grid"]) as grid:
        assert grid.size[0] == 260 + 3 * 132                    # labels, the control, two ratios
    assert "control_images" not in json.loads((tmp_path / "sweep.json").read_text())


@pytest.mark.parametrize("extra,message", [
    (("--backend", "onnxruntime"), "sweep --controlnet runs on --backend torch so far"),
    (("--prompt", "a red circle on a white background"), "draws the shapes world's held-out outlines"),
])
def test_sweep_controlnet_refusals(cli_here, tmp_path, extra, message):
    res = cli_here("sweep", "--model", "flux-tiny", "--controlnet", "flux-tiny-controlnet", "--out", tmp_path, *extra)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    res = cli_here("sweep", "--model", "sdxl-tiny", "--controlnet", "flux-tiny-controlnet", "--out", tmp_path)
    assert res.returncode == 2 and "flux-tiny-controlnet is not a sdxl ControlNet" in res.stderr


def test_a_channel_concat_control_model_is_served_through_flux_control_pipeline(artifacts, tmp_path, cli_here):
    """flux-tiny-canny (FLUX.1-Canny-dev's layout at tiny size, untrained: 16 latent + 16 control channels in, 16
    out): FluxControlPipeline VAE-encodes the control image and concatenates it; the served graph in ONNX Runtime
    against the same pipeline on PyTorch with ToMA, over a loop; the control image changes the result."""
    from toma_export.onnx import export
    from toma_export.parity.metrics import compare, tolerance
    from toma_export.serve import load_network, load_pipeline
    from toma_export.serve.pipeline import attach

    spec = te.models.get("flux-tiny-canny")
    assert spec.channel_control and spec.pipeline_class == "FluxControlPipeline"
    meta = export("flux-tiny-canny", ToMAConfig(), artifacts / "onnx", OPTIONS, progress=lambda m: None)
    assert next(i for i in meta["inputs"] if i["name"] == "hidden_states")["shape"] == [1, 8, 8, 32]

    def run(pipe, image):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a blue triangle on a white background", height=SIZE, width=SIZE, num_inference_steps=STEPS,
                    output_type="latent", generator=torch.Generator().manual_seed(2), **spec.control_kwargs([image], []),
                    **spec.pipeline_kwargs()).images

    image = control_image("flux")
    reference = load_pipeline("flux-tiny-canny")
    apply_toma(reference, ToMAConfig())
    ref = run(reference, image)
    served = load_pipeline("flux-tiny-canny", network=False)
    attach(served, load_network(meta["onnx"]))
    got = run(served, image)
    assert type(served).__name__ == "FluxControlPipeline"
    assert compare(ref.numpy(), got.numpy(), *tolerance("loop", "fp32"))["passed"]
    assert (run(served, image.transpose(0)) - got).abs().max() > 1e-3
    res = cli_here("generate", "--model", "flux-tiny-canny", "--prompt", "a red circle", "--out", tmp_path / "x.png",
                   "--controlnet", "flux-tiny-controlnet", "--control-image", tmp_path / "c.png")
    assert res.returncode == 2 and "concatenates its control image's latents: give one --control-image and no" \
        in res.stderr


def test_rtx_builds_the_controlnet_and_the_network_taking_its_residuals(exports, artifacts, cli_here):
    """`build --controlnet` on TensorRT-RTX (ahead of time, no GPU): the ControlNet's engine and the network's, from
    the same exports the ONNX tests made (no trace), the selection body inlined in both."""
    pytest.importorskip("tensorrt_rtx", reason="needs tensorrt-rtx-cu13 (installed by make test)")
    res = cli_here("build", "--model", "flux-tiny", "--backend", "tensorrt-rtx", "--static", "--opt-size",
                   f"{SIZE}x{SIZE}", "--controlnet", "flux-tiny-controlnet", "--output-dir", artifacts, "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads(res.stdout)
    (cn,) = meta["controlnets"]
    assert meta["onnx"] == exports["flux"]["network"]["onnx"] and cn["onnx"] == exports["flux"]["controlnets"][0]["onnx"]
    for engine in (meta, cn):
        assert engine["backend"] == "tensorrt-rtx" and engine["selection"] == "inlined ONNX body"
        assert engine["engine_bytes"] > 100_000
    assert {i["name"] for i in meta["inputs"]} >= {"control_block.0", "control_single.3"}
    assert {o["name"] for o in cn["outputs"]} >= {"control_block.1", "control_single.0"}
    assert "tracing" not in res.stderr


COUNT, FOLLOW_STEPS = 4, 12       # held-out samples, denoising steps
# (least IoU with the ControlNet, least gain over scale 0): SDXL meets the goal of 0.5 at 128 px (measured
# 0.85 over 24 samples at 28 steps, docs/controlnet.md). flux-tiny-controlnet was trained at 256 px and ToMA at its
# default costs it most (0.72 -> 0.55 there); at this module's 128 px with ToMA it gives 0.30 against 0.08 unsteered
# (12 steps; 0.26 before its ToMA-aware phase), so it is held to following clearly better than without, not to the
# goal.
FOLLOW = {"sdxl": (0.5, 0.2), "flux": (0.2, 0.1)}


@pytest.mark.parametrize("family", PAIRS)
def test_served_images_follow_their_control(exports, family):
    """The trained tiny ControlNet served in ONNX Runtime, ToMA in network and ControlNet: held-out outlines are
    followed (the judge's control IoU), and without the ControlNet (scale 0) the shapes land elsewhere."""
    from toma_export import shapes
    from toma_export.quality.judge import CONTROL_SEED, mean_control_scores

    samples = [shapes.sample(CONTROL_SEED, i, SIZE) for i in range(COUNT)]
    pipe, _ = served(family, exports[family])
    pipe.set_progress_bar_config(disable=True)
    spec = te.models.get(PAIRS[family][0])

    def iou(scale: float) -> float:
        images = [pipe(s.caption, height=SIZE, width=SIZE, num_inference_steps=FOLLOW_STEPS, guidance_scale=1.0,
                       generator=torch.Generator().manual_seed(i), **spec.control_kwargs([s.control()], [scale]),
                       **spec.pipeline_kwargs()).images[0] for i, s in enumerate(samples)]
        return mean_control_scores(images, [s.mask() for s in samples], [s.caption for s in samples])["iou"]

    steered, unsteered = iou(1.0), iou(0.0)
    least, gain = FOLLOW[family]
    assert steered >= least and steered > unsteered + gain, (steered, unsteered)
