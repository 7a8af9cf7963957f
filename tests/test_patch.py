import pytest
import torch

import toma_export as te
from conftest import rel_err, run

MODELS = ["flux-tiny", "sdxl-tiny"]
# How far ToMA 0.5 may move the trained models on smooth inputs: they move by 0.09-0.25 (flux-tiny) and 0.014-0.017
# (sdxl-tiny, which merges one level); unmerged tokens scrambled move them by 0.39-0.55 and 0.07-0.09.
CLOSE = {"flux-tiny": 0.35, "sdxl-tiny": 0.045}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("size", [(256, 256), (192, 320)])
def test_patched_model_runs_and_stays_close_on_smooth_inputs(tiny, name, batch, size):
    model = tiny(name)
    inputs = te.models.get(name).sample_inputs(batch=batch, height=size[0], width=size[1], smooth=True)
    ref = run(model, inputs)
    te.apply_toma(model)
    out = run(model, inputs)
    te.remove_toma(model)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert 1e-4 < rel_err(out, ref) < CLOSE[name]


@pytest.mark.parametrize("name", MODELS)
def test_bf16_runs_and_tracks_fp32(tiny, name):
    spec = te.models.get(name)
    inputs = spec.sample_inputs(batch=2, smooth=True)
    ref = run(tiny(name), inputs)
    model = tiny(name, torch.bfloat16)
    te.apply_toma(model)
    out = run(model, spec.sample_inputs(batch=2, smooth=True, dtype=torch.bfloat16))
    te.remove_toma(model)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(out, ref) < 0.2


@pytest.mark.parametrize("name", MODELS)
def test_identity_merge_reproduces_the_model(tiny, name):
    """ratio 0 keeps every token as its own destination; a very sharp softmax makes merge a permutation,
    so the re-implemented blocks must give the original outputs (any bug in RoPE/attention shows here)."""
    model = tiny(name)
    inputs = te.models.get(name).sample_inputs(batch=2, height=128, width=256)   # white noise: no near-duplicates
    ref = run(model, inputs)
    te.apply_toma(model, te.ToMAConfig(ratio=0.0, scale=1e7, blocks=["*"]))
    out = run(model, inputs)
    te.remove_toma(model)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("name", MODELS)
def test_error_grows_with_ratio(tiny, name):
    model = tiny(name)
    inputs = te.models.get(name).sample_inputs(batch=1, smooth=True)
    ref = run(model, inputs)
    errs = []
    for ratio in (0.25, 0.5, 0.75):
        te.apply_toma(model, te.ToMAConfig(ratio=ratio))
        errs.append(rel_err(run(model, inputs), ref))
    te.remove_toma(model)
    assert errs == sorted(errs) and errs[0] > 0


@pytest.mark.parametrize("name", MODELS)
def test_remove_is_bit_exact_and_apply_twice_reconfigures(tiny, name):
    model = tiny(name)
    classes = {n: type(m) for n, m in model.named_modules()}
    inputs = te.models.get(name).sample_inputs(batch=2, smooth=True)
    ref = run(model, inputs)
    first = te.apply_toma(model, te.ToMAConfig(ratio=0.25))
    second = te.apply_toma(model, te.ToMAConfig(ratio=0.75, blocks=["*"]))
    assert len(second.blocks) == second.total > len(first.blocks)
    merged_75 = run(model, inputs)
    te.apply_toma(model, te.ToMAConfig(ratio=0.75, blocks=["*"]))
    assert torch.equal(run(model, inputs), merged_75)             # re-applying is clean, not stacked
    assert te.remove_toma(model) is True and te.remove_toma(model) is False
    assert torch.equal(run(model, inputs), ref)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not any(hasattr(m, "_toma") for m in model.modules())
    assert not model._forward_pre_hooks and not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", MODELS)
def test_each_batch_element_gets_its_own_destinations(tiny, name):
    """A batch of two different elements gives exactly what each element gives alone."""
    model = tiny(name)
    spec = te.models.get(name)
    a, b = spec.sample_inputs(batch=1, seed=1, smooth=True), spec.sample_inputs(batch=1, seed=2, smooth=True)
    both = {k: _cat(a[k], b[k], k) for k in a}
    te.apply_toma(model)
    out_a, out_b, out_ab = run(model, a), run(model, b), run(model, both)
    state = te.toma_state(model)
    dst = next(c.merge.dst for c in state.cache.values() if c.merge.batch == 2)
    te.remove_toma(model)
    assert not torch.equal(dst[0], dst[1])
    torch.testing.assert_close(out_ab, torch.cat([out_a, out_b]), atol=1e-4, rtol=1e-4)


def _cat(x, y, key):
    if isinstance(x, dict):
        return {k: torch.cat([x[k], y[k]]) for k in x}
    if key in ("img_ids", "txt_ids"):
        return x
    return torch.cat([x, y])


def test_flux_default_blocks_follow_the_official_split(tiny):
    report = te.apply_toma(tiny("flux-tiny"))
    te.remove_toma(tiny("flux-tiny"))
    # 4 double / 8 single blocks: skip round(4*5/19) = 1 and round(8*5/38) = 1, as 5 of 19 / 5 of 38
    assert report.groups == {"transformer_blocks": [f"transformer_blocks.{i}" for i in (1, 2, 3)],
                             "single_transformer_blocks": [f"single_transformer_blocks.{i}" for i in range(1, 8)]}
    assert "patched 10 of 12 flux blocks" in str(report)


def test_sdxl_default_is_the_highest_resolution_level_and_levels_widens(tiny):
    model = tiny("sdxl-tiny")
    top = te.apply_toma(model)
    assert all(g.startswith(("down_blocks.1.", "up_blocks.1.")) for g in top.groups)
    assert len(top.groups) == 5 and len(top.blocks) == 10
    both = te.apply_toma(model, te.ToMAConfig(levels=2, tile=(2, 2)))
    te.remove_toma(model)
    assert len(both.blocks) == both.total == 22
    assert "mid_block.attentions.0" in both.groups


def test_sublayer_choice_changes_what_is_merged(tiny):
    model = tiny("sdxl-tiny")
    inputs = te.models.get("sdxl-tiny").sample_inputs(smooth=True)
    ref = run(model, inputs)
    errs = {}
    for sub in [("attn",), ("mlp",), ("attn", "cross_attn", "mlp")]:
        te.apply_toma(model, te.ToMAConfig(sublayers=sub))
        errs[sub] = rel_err(run(model, inputs), ref)
    te.remove_toma(model)
    assert 0 < errs[("attn",)] < errs[("attn", "cross_attn", "mlp")]
    assert 0 < errs[("mlp",)] < errs[("attn", "cross_attn", "mlp")]
    # FLUX double blocks merge attention only: a "mlp"-only config patches just the single blocks
    report = te.apply_toma(tiny("flux-tiny"), te.ToMAConfig(sublayers=("mlp",)))
    te.remove_toma(tiny("flux-tiny"))
    assert list(report.groups) == ["single_transformer_blocks"]


def test_pipeline_like_objects_are_patched_through_their_network(tiny):
    class Pipe:
        transformer = tiny("flux-tiny")

    report = te.apply_toma(Pipe())
    assert te.remove_toma(Pipe()) and report.family == "flux"


def test_unpatchable_models_and_configs_are_refused(tiny):
    with pytest.raises(TypeError, match="cannot patch a Linear"):
        te.apply_toma(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="match none of the 12 flux blocks"):
        te.apply_toma(tiny("flux-tiny"), te.ToMAConfig(blocks=["down_blocks.*"]))
    with pytest.raises(ValueError, match="nothing to patch"):
        te.apply_toma(tiny("flux-tiny"), te.ToMAConfig(sublayers=("cross_attn",)))
    assert not hasattr(tiny("flux-tiny"), "_toma")


@pytest.mark.parametrize("name", MODELS)
def test_tile_not_dividing_the_grid_is_a_clear_error(tiny, name):
    model = tiny(name)
    te.apply_toma(model, te.ToMAConfig(tile=(3, 3)))
    with pytest.raises(ValueError, match=r"tile 3x3 does not divide the 8x8 token grid"):
        run(model, te.models.get(name).sample_inputs(height=128, width=128))
    te.remove_toma(model)


def test_default_blocks_on_the_real_depths():
    """FLUX.1-dev's 19 double / 38 single blocks and SDXL's (1, 2, 10) transformer layout, at toy widths."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=19, num_single_layers=38,
                                  attention_head_dim=8, num_attention_heads=1, joint_attention_dim=8,
                                  pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    report = te.apply_toma(flux)
    assert report.groups["transformer_blocks"][0] == "transformer_blocks.5" and len(report.groups["transformer_blocks"]) == 14
    assert report.groups["single_transformer_blocks"][0] == "single_transformer_blocks.5"
    assert len(report.groups["single_transformer_blocks"]) == 33
    unet = UNet2DConditionModel(
        sample_size=32, block_out_channels=(32, 64, 64), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 4),
        cross_attention_dim=16, use_linear_projection=True, norm_num_groups=32)
    report = te.apply_toma(unet)
    # the 64x64 level at 1024 px: down_blocks.1 (2 attentions) and up_blocks.1 (3), 2 layers each
    assert len(report.blocks) == 10 and set(report.downsample.values()) == {2}
    assert all(g.startswith(("down_blocks.1.", "up_blocks.1.")) for g in report.groups)


def test_sdxl_block_in_tile_order_matches_merging_in_raster_order():
    """The SDXL patch runs each block in tile order (two layout copies per block instead of six); it must
    compute what merging each sub-layer from raster order computes, written out here step by step."""
    from diffusers.models.attention import BasicTransformerBlock

    from toma_export.families import sdxl
    from toma_export.toma import ToMAConfig
    from toma_export.toma.merge import TileMerge
    from toma_export.toma.patch import _swapped
    from toma_export.toma.state import ToMAState

    torch.manual_seed(0)
    block = BasicTransformerBlock(32, 2, 16, cross_attention_dim=24, activation_fn="geglu",
                                  norm_type="layer_norm").eval()
    x, ctx = torch.randn(2, 64, 32), torch.randn(2, 5, 24)
    with torch.no_grad():
        m = TileMerge.compute(block.norm1(x), (8, 8), (4, 4), 0.5, 1000.0)
        h = x + m.unmerge(block.attn1(m.merge(block.norm1(x))))
        h = h + m.unmerge(block.attn2(m.merge(block.norm2(h)), encoder_hidden_states=ctx))
        want = h + m.unmerge(block.ff(m.merge(block.norm3(h))))

        state = ToMAState(ToMAConfig())
        state.grids["g"] = (8, 8)
        block.__class__ = _swapped(sdxl._Block, BasicTransformerBlock)
        block._toma, block._toma_group = state, "g"
        got = block(x, encoder_hidden_states=ctx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, x)
