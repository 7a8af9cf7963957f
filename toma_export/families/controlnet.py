"""ControlNets as graphs of their own: an SDXL ControlNetModel and a FLUX ControlNet (InstantX/Union layout).

A ControlNet graph takes the network's inputs plus the control (and its scale) and returns the residuals the
network adds after its blocks; the network's graph takes them as inputs (`ModelSpec.with_control`). Kept apart,
one network graph serves every ControlNet of a layout, and a ControlNet of the same architecture is another
weight set of one traced graph (weights as data, as with LoRAs); several ControlNets' residuals are summed
between the graphs, as diffusers' MultiControlNet does. ToMA patches a ControlNet's blocks as it does the
network's, since they are the same blocks.

The tiny ControlNets (sdxl-tiny-controlnet, flux-tiny-controlnet) start from their network, as diffusers'
`from_unet` / `from_transformer` make them; until trained weights ship, their zero-initialised output layers
are drawn at random from the seed, so that their residuals are not zero.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from diffusers.models.controlnets.controlnet import ControlNetModel
from diffusers.models.controlnets.controlnet_flux import FluxControlNetModel

from ..errors import UsageError
from . import flux, sdxl
from .spec import ModelSpec, refuse

CONDITION = "controlnet_cond"
SCALE = "conditioning_scale"
MODE = "controlnet_mode"
SDXL_UNSHUFFLE = 8          # SDXL's control image enters the graph 8x8 pixels per latent cell (B, 3*64, h, w)
# the modes of InstantX's FLUX.1-dev-Controlnet-Union, in its order (its model card); any Union takes 0..num_mode-1
UNION_MODES = ("canny", "tile", "depth", "blur", "pose", "gray", "lq")


class _ControlNet:
    """What both families' ControlNet specs share: no First-Block Cache split, their own residual outputs, and the
    tiny ones built from their network."""

    parts = ()
    base_model = ""          # the registered network a tiny ControlNet is made from

    def output_names(self) -> list[str]:
        return self.residual_names()

    def union(self) -> bool:
        """Whether the ControlNet takes a mode per call (a Union ControlNet: one model, several conditions)."""
        return False

    def residual_names(self) -> list[str]:
        raise NotImplementedError

    def residual_layout(self) -> tuple:
        """What the network's graph must take to add this ControlNet's residuals (`with_control`)."""
        raise NotImplementedError

    def check_control(self, layout: tuple) -> None:
        raise UsageError(f"{self.name} is a ControlNet: it gives residuals, the network takes them")

    def load(self, dtype: torch.dtype = torch.float32, seed: int = 0, trained: bool = True) -> torch.nn.Module:
        if self.source is not None:
            return super().load(dtype, seed, trained)
        from . import specs

        state = self._trained() if trained else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.from_network(specs()[self.base_model].load(torch.float32, seed, trained))
            if state is not None:
                model.load_state_dict(state)
            else:
                for layer in self.zero_layers(model):
                    for p in layer.parameters():
                        torch.nn.init.normal_(p, std=0.05)
        return torch.nn.Module.to(model, dtype).eval()

    def base_label(self, seed: int = 0) -> str:
        if self.source is None and self._trained() is None:
            return f"untrained: {self.base_model}'s weights, output layers drawn at seed {seed}"
        return super().base_label(seed)

    def from_network(self, network) -> torch.nn.Module:
        raise NotImplementedError

    def zero_layers(self, model) -> list:
        raise NotImplementedError


def init_config(cls, config: dict) -> dict:
    """The entries of `config` that `cls` takes (a ControlNet's from its network's)."""
    names = set(inspect.signature(cls.__init__).parameters)
    return {k: v for k, v in config.items() if k in names}


@dataclass(frozen=True)
class SdxlControlNetSpec(_ControlNet, sdxl.SdxlSpec):
    subfolder = "controlnet"
    base_model = "sdxl-tiny"
    quant_skip = sdxl.SdxlSpec.quant_skip + ("controlnet_", )

    model_cls = ControlNetModel

    def residual_names(self) -> list[str]:
        return sdxl.residual_names(self.architecture())

    def residual_layout(self) -> tuple:
        return ("sdxl", len(sdxl.residual_levels(self.architecture())[0]))

    # Graph layout: the UNet's inputs, the control image as 8x8-pixel cells (so that its axes are the latent's),
    # and the conditioning scale ([1]).
    def input_axes(self) -> dict:
        axes = super().input_axes()
        axes[CONDITION] = {0: ("batch", 1), 2: ("height", 1), 3: ("width", 1)}
        axes[SCALE] = {}
        return axes

    def extra_inputs(self, x: dict, seed: int) -> dict:
        b, _, h, w = x["sample"].shape
        g = torch.Generator().manual_seed(seed + 2)
        image = torch.rand(b, 3, h * SDXL_UNSHUFFLE, w * SDXL_UNSHUFFLE, generator=g).to(x["sample"].dtype)
        return {CONDITION: to_cells(image), SCALE: torch.ones(1, dtype=x["sample"].dtype)}

    def graph_call(self, model, sample, timestep, encoder_hidden_states, text_embeds, time_ids, cond, scale):
        added = dict(text_embeds=text_embeds.float(), time_ids=time_ids)
        image = F.pixel_shuffle(cond, SDXL_UNSHUFFLE)
        down, mid = model(sample, timestep, encoder_hidden_states, controlnet_cond=image, conditioning_scale=scale,
                          added_cond_kwargs=added, return_dict=False)
        return (*down, mid)

    # Serving: ControlNetModel's call as StableDiffusionXLControlNetPipeline makes it (the control image in
    # [0, 1], resized by the pipeline; the CFG batch as the UNet's).
    def served_call(self, config, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                    class_labels=None, timestep_cond=None, attention_mask=None, added_cond_kwargs=None,
                    cross_attention_kwargs=None, guess_mode=False, return_dict=True):
        refuse(class_labels=class_labels, timestep_cond=timestep_cond, attention_mask=attention_mask,
               cross_attention_kwargs=cross_attention_kwargs, guess_mode=guess_mode or None)
        net, timestep, pixels, _ = sdxl.SdxlSpec.served_call(self, config, sample, timestep, encoder_hidden_states,
                                                             added_cond_kwargs=added_cond_kwargs)
        net[CONDITION] = to_cells(controlnet_cond.to(sample.dtype))
        net[SCALE] = scale_input(conditioning_scale, sample)
        names = self.residual_names()

        def finish(out):
            down, mid = tuple(out[n].to(sample.dtype) for n in names[:-1]), out[names[-1]].to(sample.dtype)
            if not return_dict:
                return down, mid
            from diffusers.models.controlnets.controlnet import ControlNetOutput
            return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)

        return net, timestep, pixels, finish

    def network_attributes(self, config: dict) -> dict:
        return {}

    def from_network(self, network):
        return ControlNetModel.from_unet(network)

    def zero_layers(self, model) -> list:
        return [*model.controlnet_down_blocks, model.controlnet_mid_block,
                model.controlnet_cond_embedding.conv_out]


def to_cells(image: torch.Tensor) -> torch.Tensor:
    """An SDXL control image (B, 3, H, W) as the graph takes it: (B, 3*64, H/8, W/8)."""
    return F.pixel_unshuffle(image, SDXL_UNSHUFFLE)


@dataclass(frozen=True)
class FluxControlNetSpec(_ControlNet, flux.FluxSpec):
    subfolder = "controlnet"
    base_model = "flux-tiny"

    model_cls = FluxControlNetModel

    def residual_layout(self) -> tuple:
        a = self.architecture()
        return ("flux", a["num_layers"], a["num_single_layers"], 0)

    def residual_names(self) -> list[str]:
        return flux.residual_names(self.residual_layout())

    def union(self) -> bool:
        return bool(self.architecture().get("num_mode"))

    def num_modes(self) -> int:
        return int(self.architecture().get("num_mode") or 0)

    # Graph layout: the transformer's inputs, the control image's packed latent as (B, H, W, C) like the
    # image's, the Union mode (B, 1) where the ControlNet has modes, and the conditioning scale ([1]).
    def input_axes(self) -> dict:
        if self.architecture().get("conditioning_embedding_channels"):
            raise UsageError(f"{self.name}: a FLUX ControlNet with a pixel hint block (XLabs layout) is not supported "
                             "yet; the InstantX/Union layout (control image through the VAE) is")
        axes = super().input_axes()
        axes[CONDITION] = {0: ("batch", 1), 1: ("height", 1), 2: ("width", 1)}
        if self.union():
            axes[MODE] = {0: ("batch", 1)}
        axes[SCALE] = {}
        return axes

    def extra_inputs(self, x: dict, seed: int) -> dict:
        latent = x["hidden_states"]
        g = torch.Generator().manual_seed(seed + 2)
        out = {CONDITION: torch.randn(latent.shape, generator=g).to(latent.dtype),
               SCALE: torch.ones(1, dtype=latent.dtype)}
        if self.union():
            out[MODE] = torch.zeros(latent.shape[0], 1, dtype=torch.int64)
        return out

    def graph_call(self, model, *inputs):
        x = dict(zip(self.input_axes(), inputs))
        b, h, w, c = x["hidden_states"].shape
        flat = lambda t: t.reshape(b, h * w, t.shape[-1])  # noqa: E731
        blocks, singles = model(hidden_states=flat(x["hidden_states"]), controlnet_cond=flat(x[CONDITION]),
                                controlnet_mode=x.get(MODE), conditioning_scale=x[SCALE],
                                encoder_hidden_states=x["encoder_hidden_states"],
                                pooled_projections=x["pooled_projections"], timestep=x["timestep"],
                                img_ids=flux.image_ids(h, w, x["txt_ids"]), txt_ids=x["txt_ids"],
                                guidance=x.get("guidance"), return_dict=False)
        return tuple(t.reshape(b, h, w, -1) for t in (*blocks, *(singles or ())))

    # Serving: FluxControlNetModel's call as FluxControlNetPipeline makes it (the control image VAE-encoded and
    # packed like the latent).
    def served_call(self, config, hidden_states, controlnet_cond, controlnet_mode=None, conditioning_scale=1.0,
                    encoder_hidden_states=None, pooled_projections=None, timestep=None, img_ids=None, txt_ids=None,
                    guidance=None, joint_attention_kwargs=None, return_dict=True):
        net, timestep, pixels, _ = flux.FluxSpec.served_call(
            self, config, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
            guidance, joint_attention_kwargs)
        b, rows, cols, _ = net["hidden_states"].shape
        net[CONDITION] = controlnet_cond.to(hidden_states.dtype).reshape(b, rows, cols, -1)
        if self.union():
            if controlnet_mode is None:
                raise UsageError(f"{self.name} is a Union ControlNet: the call must pass control_mode")
            net[MODE] = controlnet_mode.reshape(b, 1).to(torch.int64)
        net[SCALE] = scale_input(conditioning_scale, hidden_states)
        double, single = flux.residual_names(self.residual_layout(), "block"), flux.residual_names(
            self.residual_layout(), "single")

        def finish(out):
            flat = lambda name: out[name].reshape(b, rows * cols, -1).to(hidden_states.dtype)  # noqa: E731
            blocks, singles = tuple(flat(n) for n in double), tuple(flat(n) for n in single) or None
            if not return_dict:
                return blocks, singles
            from diffusers.models.controlnets.controlnet_flux import FluxControlNetOutput
            return FluxControlNetOutput(controlnet_block_samples=blocks, controlnet_single_block_samples=singles)

        return net, timestep, pixels, finish

    def network_attributes(self, config: dict) -> dict:
        # FluxControlNetPipeline VAE-encodes the control image where the ControlNet has no pixel hint block
        return dict(input_hint_block=None)

    def from_network(self, network):
        c = self.config
        return FluxControlNetModel.from_transformer(network, num_layers=c["num_layers"],
                                                    num_single_layers=c["num_single_layers"],
                                                    attention_head_dim=c["attention_head_dim"],
                                                    num_attention_heads=c["num_attention_heads"])

    def zero_layers(self, model) -> list:
        return [*model.controlnet_blocks, *model.controlnet_single_blocks, model.controlnet_x_embedder]


def control_modes(controlnets: list, modes) -> tuple:
    """The mode of each ControlNet (an int for a Union one, None for the rest) from `--control-mode`, given once per
    ControlNet in order (a name or number; "none" or None for one that is not a Union), checked before any work."""
    if modes and not controlnets:
        raise UsageError("--control-mode goes with --controlnet: drop it, or add the Union ControlNet")
    unions = [spec.name for spec in controlnets if spec.union()]
    if not modes:
        if unions:
            raise UsageError(f"{unions[0]} is a Union ControlNet: give its mode with --control-mode MODE (one per "
                             f"--controlnet, in order; {', '.join(UNION_MODES)} or a number)")
        return (None,) * len(controlnets)
    if not unions:
        raise UsageError("--control-mode is for Union ControlNets, which take a mode per call; none of the "
                         "--controlnet given is one: drop --control-mode")
    if len(modes) != len(controlnets):
        raise UsageError(f"{len(controlnets)} --controlnet and {len(modes)} --control-mode: give one mode per "
                         "ControlNet, in the same order ('none' for one that is not a Union)")
    out = []
    for spec, text in zip(controlnets, modes):
        text = "none" if text is None else str(text).strip().lower()
        if not spec.union():
            if text != "none":
                raise UsageError(f"--control-mode {text} for {spec.name}, which is not a Union ControlNet: give 'none' "
                                 "in its place")
            out.append(None)
            continue
        mode = UNION_MODES.index(text) if text in UNION_MODES else int(text) if text.isdigit() else None
        if mode is None or mode >= spec.num_modes():
            raise UsageError(f"--control-mode {text} for {spec.name}: give a number 0..{spec.num_modes() - 1} or one "
                             f"of InstantX's names ({', '.join(UNION_MODES[:spec.num_modes()])})")
        out.append(mode)
    return tuple(out)


def scale_input(scale, like: torch.Tensor) -> torch.Tensor:
    """The conditioning scale as the graph's [1] input (the pipelines pass a float, or a tensor of one)."""
    return torch.as_tensor(scale, dtype=like.dtype).reshape(-1)[:1].expand(1).clone()


# class name in a folder's config.json -> (family, spec class)
FOLDER_CLASSES = {"ControlNetModel": ("sdxl", SdxlControlNetSpec), "FluxControlNetModel": ("flux", FluxControlNetSpec)}


def of_network(cls, network: ModelSpec, **changes) -> ModelSpec:
    """A ControlNet spec with its network's sizes, ranges and variant."""
    values = {f.name: getattr(network, f.name) for f in fields(network)}
    return cls(**{**values, **changes})


def specs(networks: dict) -> dict:
    """The tiny ControlNets: half their network's depth (as InstantX's FLUX ControlNet is a quarter of FLUX.1's)."""
    flux_config = dict(init_config(FluxControlNetModel, flux.TINY), num_layers=2, num_single_layers=4)
    hub = dict(source=None, config={})
    return {
        # the real ones, from a local folder or the hub cache (their architectures in models/real_configs.py)
        "sdxl-controlnet-canny": of_network(SdxlControlNetSpec, networks["sdxl"], name="sdxl-controlnet-canny",
                                            **dict(hub, source="diffusers/controlnet-canny-sdxl-1.0")),
        "flux-controlnet-union": of_network(FluxControlNetSpec, networks["flux"], name="flux-controlnet-union",
                                            **dict(hub, source="InstantX/FLUX.1-dev-Controlnet-Union")),
        "sdxl-tiny-controlnet": of_network(SdxlControlNetSpec, networks["sdxl-tiny"], name="sdxl-tiny-controlnet",
                                           config=init_config(ControlNetModel, sdxl.TINY)),
        "flux-tiny-controlnet": of_network(FluxControlNetSpec, networks["flux-tiny"], name="flux-tiny-controlnet",
                                           config=flux_config),
    }
