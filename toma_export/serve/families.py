"""The pipelines' calls in the graphs' layout: FluxPipeline -> FluxNetwork, StableDiffusionXLPipeline ->
SdxlNetwork. Their forwards take what the diffusers models take and refuse, by name, what an exported
graph cannot honour (IP-Adapter / attention kwargs, ControlNet residuals). `load_network` picks the class
its model spec names."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from .. import models
from ..artifacts import Artifact
from ..errors import UsageError
from ..models.flux import image_ids
from .network import ServedNetwork


def _output(sample: torch.Tensor, return_dict: bool, cls_path: tuple[str, str]):
    if not return_dict:
        return (sample,)
    import importlib

    return getattr(importlib.import_module(cls_path[0]), cls_path[1])(sample=sample)


def _refuse(**kwargs) -> None:
    used = [k for k, v in kwargs.items() if v is not None and not (isinstance(v, dict) and not v)]
    if used:
        raise UsageError(f"exported graphs take no {', '.join(used)}; run the PyTorch model for those features")


class FluxNetwork(ServedNetwork):
    """FluxTransformer2DModel's call. The pipeline packs the latent as (B, H*W, C) tokens with img_ids; the
    graph takes (B, H, W, C) and rebuilds img_ids itself, so the grid is read off img_ids and checked."""

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                img_ids=None, txt_ids=None, guidance=None, joint_attention_kwargs=None, controlnet_block_samples=None,
                controlnet_single_block_samples=None, return_dict: bool = True, controlnet_blocks_repeat=False):
        _refuse(joint_attention_kwargs=joint_attention_kwargs, controlnet_block_samples=controlnet_block_samples,
                controlnet_single_block_samples=controlnet_single_block_samples)
        b, n, c = hidden_states.shape
        rows, cols = self._grid(img_ids, n)
        if txt_ids.ndim == 3:                      # deprecated batched ids: every row is the same
            txt_ids = txt_ids[0]
        net = dict(hidden_states=hidden_states.reshape(b, rows, cols, c), encoder_hidden_states=encoder_hidden_states,
                   pooled_projections=pooled_projections, timestep=_per_sample(timestep, b), txt_ids=txt_ids)
        if self.config.get("guidance_embeds"):
            if guidance is None:
                raise UsageError("this FLUX graph embeds guidance: the call must pass guidance")
            net["guidance"] = _per_sample(guidance, b)
        pixels = (rows * self.spec.pixels_per_token, cols * self.spec.pixels_per_token)
        out = self.run_graph(net, timestep, pixels).reshape(b, n, -1).to(hidden_states.dtype)
        return _output(out, return_dict, ("diffusers.models.modeling_outputs", "Transformer2DModelOutput"))

    def _grid(self, img_ids, n: int) -> tuple[int, int]:
        """(rows, cols) of the raster image grid img_ids describe; anything else (reference-image tokens,
        Kontext) is refused because the graph rebuilds raster ids from the grid."""
        if img_ids is None:
            raise UsageError("FLUX calls must pass img_ids (the graph needs the token grid)")
        ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        if rows * cols != n or not torch.equal(ids.float().cpu(), image_ids(rows, cols, ids.float().cpu())):
            raise UsageError(f"img_ids do not describe one raster grid of the {n} image tokens (extra reference-image "
                             "tokens?); exported FLUX graphs take a single image grid")
        return rows, cols


class SdxlNetwork(ServedNetwork):
    """UNet2DConditionModel's call: added_cond_kwargs flattened, the timestep broadcast to the batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # StableDiffusionXLPipeline._get_add_time_ids checks its time ids against this width
        width = self.config["projection_class_embeddings_input_dim"]
        self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=width))

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None,
                down_intrablock_additional_residuals=None, encoder_attention_mask=None, return_dict: bool = True):
        _refuse(class_labels=class_labels, timestep_cond=timestep_cond, attention_mask=attention_mask,
                cross_attention_kwargs=cross_attention_kwargs,
                down_block_additional_residuals=down_block_additional_residuals,
                mid_block_additional_residual=mid_block_additional_residual,
                down_intrablock_additional_residuals=down_intrablock_additional_residuals,
                encoder_attention_mask=encoder_attention_mask)
        cond = added_cond_kwargs or {}
        if set(cond) - {"text_embeds", "time_ids"} or len(cond) != 2:
            raise UsageError(f"SDXL graphs take added_cond_kwargs text_embeds and time_ids, got {sorted(cond)}")
        b = sample.shape[0]
        net = dict(sample=sample, timestep=_per_sample(timestep, b), encoder_hidden_states=encoder_hidden_states,
                   text_embeds=cond["text_embeds"], time_ids=cond["time_ids"])
        pixels = (sample.shape[2] * self.spec.pixels_per_cell, sample.shape[3] * self.spec.pixels_per_cell)
        out = self.run_graph(net, timestep, pixels).to(sample.dtype)
        return _output(out, return_dict, ("diffusers.models.unets.unet_2d_condition", "UNet2DConditionOutput"))


def _per_sample(value, batch: int) -> torch.Tensor:
    t = torch.as_tensor(value).reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t


def load_network(artifact, baseline=None, share_weights: bool = True, cuda_graphs: bool = True,
                 schedule=None) -> ServedNetwork:
    """The drop-in for an exported model.onnx / built engine.json (paths or Artifacts). `baseline`: the same
    model exported or built without ToMA, needed when the ToMA schedule leaves steps unmerged. `schedule`: a
    ToMAConfig overriding the recorded merge_steps / dst_every (its other fields must match the file)."""
    artifact = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
    baseline = baseline if baseline is None or isinstance(baseline, Artifact) else Artifact.load(baseline)
    if baseline is not None and baseline.kind != artifact.kind:
        raise UsageError(f"{baseline.name} is an {baseline.kind} artifact but {artifact.name} is an {artifact.kind} "
                         "one; serve both through the same backend")
    cls = globals()[models.get(artifact.model).network_class]
    return cls(artifact, baseline, share_weights, cuda_graphs, schedule)
