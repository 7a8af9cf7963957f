"""ModelSpec: the base of the family objects. One spec per registered network (flux, flux-tiny, a local
folder): how to load it, its sizes, its exported graph's I/O and sample inputs, its denoising loop, its
pipeline, and how a pipeline's call of the network becomes the graph's inputs. The family modules
(flux.py, sdxl.py) subclass it and add the ToMA patch hooks and the benchmark block."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import ModelNotAvailable, UsageError
from ..weightfiles import MISMATCH, WeightSource, check_keys, stored_keys, weight_files


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str | None                       # hub id or local diffusers folder; None = random init
    config: dict = field(default_factory=dict)  # tiny: full constructor config; real: the dims we rely on
    default_size: tuple[int, int] = (1024, 1024)  # (height, width) in pixels
    text_len: int = 77
    size_range: tuple = ((512, 512), (1024, 1024), (1536, 1536))  # min/opt/max (height, width) for profiles
    text_range: tuple = (77, 77, 77)                                # min/opt/max text length for profiles
    batch_range: tuple = (1, 1, 4)                                  # min/opt/max batch (CFG doubles it)
    # what a folder implies (models.from_folder fills these in): the variant (dev/schnell, base/refiner),
    # the dtype most weights are stored in, the diffusers file variant (fp16) and the hub id it came from
    variant: str = ""
    weights_dtype: str | None = None
    weights_variant: str | None = None
    hub_id: str | None = None
    # ControlNet residuals the network graph takes as inputs (empty: none): the layout of the ControlNets'
    # outputs (`ControlNetSpec.residual_layout`), part of the graph, since it sets the inputs
    control: tuple = ()

    family = ""          # "flux" | "sdxl"
    model_cls = None     # the diffusers network class
    subfolder = ""       # the network's folder inside a pipeline folder
    pixels_per_token = 16  # side of one image token in pixels: 8x VAE, times 2x2 packing (FLUX) or level-1 (SDXL)
    size_multiple = 16     # pixel sizes must be multiples of this
    # The exported graph: its spatial input is the image in units of `pixels_per_cell` pixels (FLUX: the
    # token grid, SDXL: the latent), and each input axis is named batch/height/width/text with a divisor.
    pixels_per_cell = 16
    output_name = "noise_pred"
    grid_is_input = False   # the graph's spatial input is the token grid itself (FLUX); else hooks read theirs
    # Serving: the diffusers pipeline around the network (which it keeps under `subfolder`) and the
    # default guidance scale.
    pipeline_class = ""
    controlnet_pipeline_class = ""    # the pipeline that runs it with ControlNets
    channel_control = False           # it concatenates a control image's latents as input channels (FLUX.1 Canny)
    default_guidance = 1.0
    # First-Block Cache: the graphs the network splits into (FLUX: head, tail; none where it cannot split) and the
    # block the head ends with
    parts = ()
    head_block = ""
    quant_skip = ()        # 8-bit: name fragments of the layers left unquantized (quantize.layers)

    def cfg_batch(self, guidance: float) -> int:
        """How many samples one image puts through the network (2 where guidance runs CFG)."""
        return 1

    def output_names(self) -> list[str]:
        """The exported graph's outputs besides ToMA's (a network: its prediction; a ControlNet: its residuals)."""
        return [self.output_name]

    def with_control(self, layout: tuple | None) -> "ModelSpec":
        """The network whose graph also takes a ControlNet's residuals (`layout`: their `residual_layout`), added
        where diffusers adds them; refused where this network cannot take them."""
        if not layout:
            return self
        self.check_control(tuple(layout))
        return replace(self, control=tuple(layout))

    def check_control(self, layout: tuple) -> None:
        raise UsageError(f"{self.name} takes no ControlNet residuals")

    def residual_layout(self) -> tuple:
        """What a ControlNet gives (a network: nothing): the `control` of the network graph that takes it."""
        return ()

    def pipeline_kwargs(self) -> dict:
        """Extra arguments of the pipeline call that the exported graph fixes."""
        return {}

    def tiny_parts(self) -> dict:
        """The pipeline's parts besides the network and scheduler (tiny models only: text encoders, tokenizers, VAE),
        the ones the trained network reads."""
        raise NotImplementedError

    def served_call(self, config: dict, *args, **kwargs):
        """A pipeline's call of the network (the diffusers model's signature) -> (graph inputs, timestep,
        pixel size, finish): finish turns the graph's output into what the diffusers model returns.
        Arguments an exported graph cannot honour are refused by name."""
        raise NotImplementedError

    def network_attributes(self, config: dict) -> dict:
        """Attributes the pipeline reads off its network besides config, dtype and device."""
        return {}

    @property
    def default_dtype(self) -> str:
        """The dtype a run defaults to: the one the folder's weights are stored in (fp32 for random models)."""
        return self.weights_dtype or "fp32"

    def load(self, dtype: torch.dtype = torch.float32, seed: int = 0, trained: bool = True) -> torch.nn.Module:
        """The diffusers module in eval mode, loaded straight into `dtype`: for tiny models their trained weights
        (trained=False or none committed: the seeded random init), else from the folder / hub id."""
        if self.source is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = self.model_cls(**self.config)
            state = self._trained() if trained else None
            if state is not None:
                model.load_state_dict(state)
            # nn.Module.to, not ModelMixin.to: the latter warns about fp32-only modules these configs lack
            return torch.nn.Module.to(model, dtype).eval()
        folder = self._folder()
        try:
            model = self.model_cls.from_pretrained(str(folder), torch_dtype=dtype, variant=self.weights_variant,
                                                   low_cpu_mem_usage=True).eval()
        except (OSError, ValueError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise ModelNotAvailable(f"{self.name}: the weights in {folder} do not load with its config.json ({first}); "
                                    f"{MISMATCH}") from None
        stored = stored_keys(folder, self.weights_variant)
        if stored is not None:          # diffusers fills missing weights with random ones and only warns
            check_keys(stored, model.state_dict(), self.name, folder)
        return model

    def skeleton(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The network's modules on the meta device, in eval mode: its structure and every parameter's name,
        shape and dtype, and no weights (what an export traces)."""
        with torch.device("meta"):
            model = self.model_cls.from_config(self.architecture())
        return torch.nn.Module.to(model, dtype).eval()

    def architecture(self) -> dict:
        """The config the network is built from (tiny: its own; folders: config.json), without diffusers'
        bookkeeping (_name_or_path, _diffusers_version): what an exported graph depends on, and a fine-tune
        of the same architecture shares."""
        config = self.config if self.source is None else self.model_cls.load_config(str(self._folder()))
        # with the class's defaults filled in and tuples as lists, as config.json has them, so that a tiny model's
        # config and a folder saved from it are one architecture
        full = {**init_defaults(self.model_cls), **config}
        return json.loads(json.dumps({k: v for k, v in full.items() if not k.startswith("_")}))

    def weight_source(self, seed: int = 0):
        """Where an export reads the weights from, tensor by tensor: the folder's weight files, else (tiny
        models) the seeded random init, made in memory."""
        if self.source is None:
            return WeightSource.of_module(self.load(torch.float32, seed), self.base_label(seed))
        folder = self._folder()
        source = WeightSource.of_files(weight_files(folder)[self.weights_variant], str(folder))
        check_keys(source.keys(), self.skeleton().state_dict(), self.name, folder)
        return source

    def _folder(self) -> Path:
        """The network's folder (config.json and weights), or one line saying where to get it."""
        path = Path(self.source)
        if not path.is_dir():
            raise ModelNotAvailable(
                f"{self.name}: the weights of {self.source} are not in the local Hugging Face cache; download them "
                f"where the hub is reachable (`huggingface-cli download {self.source}`) or pass a local diffusers "
                f"folder holding {self.subfolder}/ as --model PATH")
        return network_folder(path, self.subfolder)

    def _trained(self) -> dict | None:
        from . import tiny

        return tiny.trained_weights(self.name)

    def base_label(self, seed: int = 0) -> str:
        """Where a model's weights come from, as toma.json records it: the folder or hub id, the committed
        trained weights of a tiny model, or its seeded random init."""
        if self.source is not None:
            return self.source
        from . import tiny

        path = tiny.trained_file(self.name)
        if path is None:
            return f"random init (seed {seed})"
        return f"trained weights ({path.name}, sha256 {tiny.file_digest(path)})"

    def weights_fingerprint(self) -> str | None:
        """A hash of the folder's config.json and of each weight file's name, size and modification time:
        part of every export key, so a folder whose contents changed (new weights, another depth at the same
        path) is exported again rather than served from a stale cache. None for random models."""
        if self.source is None or not Path(self.source).is_dir():
            return None
        folder = network_folder(Path(self.source), self.subfolder)
        digest = hashlib.sha256((folder / "config.json").read_bytes())
        for f in weight_files(folder).get(self.weights_variant, []):
            stat = f.stat()
            digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()[:12]

    def with_text_len(self, text_len: int | None) -> "ModelSpec":
        """The spec at another text length (FLUX schnell pipelines use 256 tokens, dev 512); the dynamic text
        range widens to include it."""
        if text_len is None:
            return self
        if text_len < 1:
            raise UsageError(f"--text-len must be >= 1 token, got {text_len}")
        lo, _, hi = self.text_range
        return replace(self, text_len=text_len, text_range=(min(lo, text_len), text_len, max(hi, text_len)))

    def size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) in pixels, defaulted and checked against the model's size multiple."""
        h, w = height or self.default_size[0], width or self.default_size[1]
        if h <= 0 or w <= 0 or h % self.size_multiple or w % self.size_multiple:
            raise UsageError(f"{self.name}: {h}x{w} px is not a positive multiple of {self.size_multiple} px")
        return h, w

    def token_grid(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(rows, cols) of the image-token grid ToMA tiles by default at this size."""
        h, w = self.size(height, width)
        return h // self.pixels_per_token, w // self.pixels_per_token

    def sample_inputs(self, batch: int = 1, height: int | None = None, width: int | None = None, seed: int = 0,
                      dtype: torch.dtype = torch.float32, smooth: bool = False) -> dict:
        raise NotImplementedError

    def denoise(self, inputs: dict, steps: int, predict) -> torch.Tensor:
        """The family's denoising loop (its scheduler and step_inputs) from `inputs` (sample_inputs):
        predict(step index, the network's keyword inputs) returns the output the scheduler steps with. Returns
        the last latent. For loops on the PyTorch network without a pipeline (speed sweeps, cache parity)."""
        scheduler = self.scheduler()
        scheduler.set_timesteps(steps)
        latent = inputs[self.latent_input] * getattr(scheduler, "init_noise_sigma", 1.0)
        for i, t in enumerate(scheduler.timesteps):
            latent = scheduler.step(predict(i, self.step_inputs(inputs, scheduler, latent, t)), t, latent).prev_sample
        return latent

    # -- the exported graph's network inputs (flat tensors; ToMA adds its own) --
    def input_axes(self) -> dict:
        """{input name: {axis: (symbol, divisor)}}: the axis is size(symbol) // divisor, where symbol is
        batch, text, or height/width in cells."""
        raise NotImplementedError

    def graph_inputs(self, batch=1, height=None, width=None, seed=0, dtype=torch.float32, smooth=False) -> dict:
        """Sample inputs in the exported graph's layout, {name: tensor} in graph order."""
        raise NotImplementedError

    def graph_call(self, model, *inputs: torch.Tensor) -> torch.Tensor:
        """Run the diffusers module on graph-layout inputs (positional, in graph order)."""
        raise NotImplementedError

    @property
    def cell_multiple(self) -> int:
        """The network itself needs its spatial input to be a multiple of this (UNet down-sampling)."""
        return 1

    def cells(self, height: int, width: int) -> tuple[int, int]:
        """Size of the graph's spatial input at (height, width) pixels."""
        h, w = self.size(height, width)
        return h // self.pixels_per_cell, w // self.pixels_per_cell

    def input_shapes(self, batch: int, height: int, width: int, text_len: int | None = None,
                     part: str | None = None) -> dict:
        """{name: shape} of the network inputs (`part`: of that graph of a First-Block Cache split) at a given
        batch, pixel size and text length. Nothing of that size is allocated (a served request's shapes are checked
        before any work): the sample inputs are made at the smallest profile size and their size-dependent axes,
        which input_axes names, are set from the sizes."""
        sizes = dict(zip(("height", "width"), self.cells(height, width)), batch=batch, text=text_len or self.text_len)
        shapes = {}
        (h0, w0), _, _ = self.size_range
        sample, axes = self.graph_inputs(batch=1, height=h0, width=w0), self.input_axes()
        if part is not None:
            sample, axes = self.part_inputs(part, sample), self.part_axes(part)
        for name, tensor in sample.items():
            shape = list(tensor.shape)
            for axis, (symbol, divisor) in axes.get(name, {}).items():
                shape[axis] = sizes[symbol] // divisor
            shapes[name] = tuple(shape)
        return shapes


def init_defaults(cls) -> dict:
    """The default of each constructor argument of a diffusers model class."""
    import inspect

    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def noise(shape, generator, smooth: bool, dtype) -> torch.Tensor:
    """Gaussian (B, C, H, W); smooth=True upsamples a 4x coarser field, so neighbouring tokens are similar
    as in a real image latent (white noise makes every token unlike its neighbours)."""
    if not smooth:
        return torch.randn(shape, generator=generator).to(dtype)
    b, c, h, w = shape
    coarse = torch.randn((b, c, max(1, h // 4), max(1, w // 4)), generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False).to(dtype)


def smooth_tokens(shape) -> torch.Tensor:
    """Spatially correlated features (B, H, W, C), like a latent's: a coarse random field upsampled plus
    noise, so a benchmarked selection sees structure rather than white noise."""
    b, h, w, c = shape
    coarse = torch.randn(b, c, h // 8, w // 8)
    field = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (field + 0.1 * torch.randn(b, c, h, w)).permute(0, 2, 3, 1).contiguous()


def refuse(**kwargs) -> None:
    """One line naming the call arguments an exported graph cannot honour."""
    used = [k for k, v in kwargs.items() if v is not None and not (isinstance(v, dict) and not v)]
    if used:
        raise UsageError(f"exported graphs take no {', '.join(used)}; run the PyTorch model for those features")


def per_sample(value, batch: int) -> torch.Tensor:
    """A scalar or per-sample value (timestep, guidance) as one value per sample."""
    t = torch.as_tensor(value).reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t


def model_output(sample: torch.Tensor, return_dict: bool, module: str, cls: str):
    """What the diffusers model returns: a tuple, or its output dataclass."""
    if not return_dict:
        return (sample,)
    import importlib

    return getattr(importlib.import_module(module), cls)(sample=sample)


def read_config(folder: Path, subfolder: str) -> dict | None:
    """The network's config.json in a pipeline folder or the network folder itself, if present."""
    for candidate in (folder / subfolder / "config.json", folder / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def network_folder(folder: Path, subfolder: str) -> Path:
    """The folder holding the network's config.json and weights: `subfolder` of a pipeline folder, else the
    folder itself."""
    return folder / subfolder if (folder / subfolder / "config.json").is_file() else folder
