import pytest
import torch

import toma_export as te
from conftest import run
from toma_export.errors import ModelNotAvailable


def test_registry_names_and_unknown_model():
    assert set(te.models.names()) == {"flux", "sdxl", "flux-tiny", "sdxl-tiny", "flux-canny", "sdxl-controlnet-canny",
                                      "flux-controlnet-union", "sdxl-tiny-controlnet", "flux-tiny-controlnet",
                                      "flux-tiny-canny"}
    with pytest.raises(ValueError, match="unknown model 'sd15'.*flux-tiny"):
        te.models.get("sd15")


@pytest.mark.parametrize("name", ["flux-tiny", "sdxl-tiny", "flux", "sdxl"])
def test_default_size_is_tiled_by_the_default_config(name):
    spec = te.models.get(name)
    rows, cols = spec.token_grid()
    tile = te.ToMAConfig().tile
    assert rows % tile[0] == 0 and cols % tile[1] == 0


def test_tiny_models_are_deterministic_and_have_the_real_structure():
    flux = te.models.get("flux-tiny").load()
    again = te.models.get("flux-tiny").load()
    assert all(torch.equal(a, b) for a, b in zip(flux.state_dict().values(), again.state_dict().values()))
    assert len(flux.transformer_blocks) >= 2 and len(flux.single_transformer_blocks) >= 2
    assert not flux.training
    unet = te.models.get("sdxl-tiny").load()
    assert unet.config.addition_embed_type == "text_time"
    levels = {name.split(".")[0] + "." + name.split(".")[1] for name, _ in unet.named_modules()
              if name.endswith("transformer_blocks") and name.startswith("down_blocks")}
    assert levels == {"down_blocks.1", "down_blocks.2"}


def test_sample_inputs_shapes():
    f = te.models.get("flux-tiny").sample_inputs(batch=2, height=128, width=192, seed=3)
    assert f["hidden_states"].shape == (2, 8 * 12, 16)
    assert f["img_ids"].shape == (96, 3) and f["img_ids"][13].tolist() == [0, 1, 1]
    s = te.models.get("sdxl-tiny").sample_inputs(batch=2, height=128, width=192)
    assert s["sample"].shape == (2, 4, 16, 24)
    assert s["added_cond_kwargs"]["time_ids"][0].tolist() == [128, 192, 0, 0, 128, 192]
    with pytest.raises(ValueError, match="not a positive multiple of 32 px"):
        te.models.get("sdxl-tiny").sample_inputs(height=100)
    assert te.models.get("flux").sample_inputs.__self__.config["in_channels"] == 64


@pytest.mark.parametrize("name", ["flux-tiny", "sdxl-tiny"])
def test_input_shapes_of_any_size_allocate_nothing_of_that_size(name, monkeypatch):
    """A served request's shapes are checked before any work: input_shapes builds sample inputs only at the
    smallest profile size and scales their size axes (a 65536 px request once allocated 1 GB of latents)."""
    spec = te.models.get(name)
    made, real = [], type(spec).graph_inputs
    monkeypatch.setattr(type(spec), "graph_inputs",
                        lambda self, **kw: made.append((kw["height"], kw["width"])) or real(self, **kw))
    huge = spec.input_shapes(3, 65536, 32768)
    assert set(made) == {spec.size_range[0]}
    assert max(max(s) for s in huge.values()) >= 32768 // 16 and next(iter(huge.values()))[0] == 3
    # at a size that can be allocated, the shapes are those of the real inputs
    inputs = real(spec, batch=1, height=256, width=128)
    assert spec.input_shapes(1, 256, 128) == {n: tuple(t.shape) for n, t in inputs.items()}


@pytest.mark.parametrize("name,folder", [("flux", "transformer"), ("sdxl", "unet")])
def test_real_models_without_weights_say_where_weights_are_expected(name, folder):
    with pytest.raises(ModelNotAvailable, match=rf"huggingface-cli download .*{folder}/"):
        te.models.get(name).load()


@pytest.mark.parametrize("name", ["flux-tiny", "sdxl-tiny"])
def test_local_diffusers_folder_loads_and_patches(tmp_path, name):
    spec = te.models.get(name)
    model = spec.load()
    model.save_pretrained(tmp_path / spec.subfolder)
    local = te.models.get(str(tmp_path))
    assert local.family == spec.family and local.source == str(tmp_path)
    loaded = local.load()
    inputs = local.sample_inputs(smooth=True)
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, inputs), run(model, inputs), atol=1e-5, rtol=1e-5)
    assert te.apply_toma(loaded).blocks


def test_folder_without_a_network_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no FLUX transformer or SDXL UNet config"):
        te.models.get(str(tmp_path))
