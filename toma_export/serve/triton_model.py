"""The pipeline model that Triton's Python backend runs: prompt -> image with the toolkit's served network.

`export-repo` writes a two-line model.py that imports `TritonPythonModel` from here, so the repository holds
no copy of the denoising loop: each model instance (its own process) keeps one generate.Session, the same
pipeline and ServedNetwork that `toma-export generate` runs.

Why the network runs inside this model and not as a separate tensorrt_plan model it calls: the loop feeds
every step's ToMA destinations back into the next step, which ServedNetwork already does (and on GPU its
TensorRT runner replays CUDA graphs); a plan model would add a server round trip and a tensor copy per
step. ONNX Runtime on CPU, TensorRT on GPU.

Requests: `prompt` BYTES, `height` `width` `steps` `seed` INT64, optional `guidance` and `max_seconds` FP32,
each of shape [1] per request (the batch axis Triton adds makes it [1, 1] on the wire); `image` UINT8
[1, H, W, 3] back. Triton's dynamic batcher hands one `execute` several requests; those with equal size,
steps, guidance and time budget run as one pipeline batch, up to what the export's batch range allows. Each
run starts the ToMA schedule afresh and every batch item gets its own destinations, so nothing passes
between requests.

With ControlNets (`export-repo --controlnet`, their exports in `controlnet-<i>/` beside `network/`) a request
also sends `control_image` BYTES [N], one encoded PNG or JPEG per ControlNet in the repository's order, and may
send `control_scale` FP32 [N] (default: the scales given to export-repo, the `controlnet_scales` parameter).
diffusers' ControlNet pipelines take one control image per ControlNet for a whole call, so such requests run one
at a time. Each image is checked before any work (`decode_control`): its bytes and decoded pixels within
`Limits`, PNG or JPEG only, and a mode whose conversion to RGB loses nothing; the pipeline resizes it.

Every request is checked against `Limits` before anything is allocated or run; a refusal is an INVALID_ARG
error (HTTP 400, gRPC INVALID_ARGUMENT) naming the input and what it accepts, and the other requests of the
same call still run. Work per request is bounded: the denoising loop checks after every step whether all
the requests it serves were cancelled (gRPC cancellation) and whether their time budget is spent, and stops
there, so the instance is free again within one step.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

INPUTS = ("prompt", "height", "width", "steps", "seed")      # guidance and max_seconds are optional
OPTIONAL = ("guidance", "max_seconds")
SEED_MAX = 2 ** 63 - 1
NETWORK = "network"       # the folder under the model version holding the export (or engine)
BASELINE = "baseline"     # the export without ToMA, for schedules that leave steps unmerged
CONTROL_FORMATS = ("PNG", "JPEG")       # what PIL may decode from a request: no format zoo behind a server
# modes that convert to RGB exactly; alpha would be dropped, 16-bit and float values clipped, CMYK approximated
CONTROL_MODES = ("RGB", "L", "1", "P")  # P only without transparency

MODEL_PY = '''"""Triton Python-backend model written by `toma-export export-repo`: the text-to-image pipeline lives in
toma_export.serve.triton_model. `toma-export serve` passes its environment's import path as
$TOMA_EXPORT_PYTHONPATH (the backend stub's embedded Python ignores PYTHONPATH)."""
import os
import sys

sys.path[:0] = [p for p in os.environ.get("TOMA_EXPORT_PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
try:
    from toma_export.serve.triton_model import TritonPythonModel  # noqa: F401
except ImportError as err:
    raise ImportError(f"the Triton Python backend cannot import toma-export ({err}); start the server with "
                      "`toma-export serve --repo REPO`, or set TOMA_EXPORT_PYTHONPATH to the import path of the "
                      "environment holding toma-export") from None
'''


class RequestError(ValueError):
    """One request's inputs are unusable; the message goes back to its client as INVALID_ARG."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: config.pbtxt parameters of these names, written by export-repo
    (--max-steps, --max-seconds) and changeable there."""

    max_steps: int = 100               # denoising steps, 1..max_steps
    max_seconds: float = 300.0         # time budget of a request's pipeline run; a request may ask for less
    max_guidance: float = 30.0         # guidance, 0..max_guidance
    max_prompt_bytes: int = 2048       # the prompt in UTF-8 (the text encoders truncate long before that)
    max_control_bytes: int = 8 * 2 ** 20      # one encoded control image (ControlNet repositories only)
    max_control_pixels: int = 4096 * 4096    # its width x height: a small PNG can claim a huge image

    def __post_init__(self):
        counts = (self.max_steps, self.max_prompt_bytes, self.max_control_bytes, self.max_control_pixels)
        if min(counts) < 1 or not (self.max_seconds > 0 and self.max_guidance >= 0):
            raise ValueError(f"request limits out of range: max_steps {self.max_steps} (>= 1), max_seconds "
                             f"{self.max_seconds:g} (> 0), max_guidance {self.max_guidance:g} (>= 0), "
                             f"max_prompt_bytes {self.max_prompt_bytes} (>= 1), max_control_bytes "
                             f"{self.max_control_bytes} (>= 1), max_control_pixels {self.max_control_pixels} (>= 1)")

    @classmethod
    def from_parameters(cls, params: dict) -> "Limits":
        return cls(**{f.name: type(f.default)(params[f.name]) for f in fields(cls) if params.get(f.name)})

    def parameters(self, control: bool = False) -> dict:
        """The config.pbtxt parameters; the control-image limits only where the model takes control images."""
        return {k: str(v) for k, v in asdict(self).items() if control or k not in CONTROL_LIMITS}


CONTROL_LIMITS = ("max_control_bytes", "max_control_pixels")


def control_folder(index: int, baseline: bool = False) -> str:
    """The folder under the model version holding ControlNet `index`'s export (or its baseline)."""
    return f"controlnet-{index}" + (f"-{BASELINE}" if baseline else "")


def decode_control(data: bytes, label: str, limits: Limits):
    """One request's control image from its encoded bytes, as RGB (PIL); a RequestError naming `label` unless it
    is a PNG or JPEG within the limits in a mode that converts to RGB exactly. The size in bytes is checked before
    PIL sees it, the pixel count from the header before anything is decoded."""
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_control_bytes:
        raise RequestError(f"{label} is {len(data)} bytes; the limit is {limits.max_control_bytes} bytes per image "
                           "(config.pbtxt parameter max_control_bytes)")
    unreadable = f"{label} is not a PNG or JPEG image PIL can read"
    too_large = (f"over the limit of {limits.max_control_pixels} pixels (config.pbtxt parameter max_control_pixels); "
                 "send a smaller image (the pipeline resizes it to the request's size)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # our own limit decides, below
            image = Image.open(io.BytesIO(data), formats=CONTROL_FORMATS)
    except Image.DecompressionBombError:
        raise RequestError(f"{label} is {too_large}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise RequestError(f"{unreadable} ({type(err).__name__}); send the encoded file's bytes") from None
    width, height = image.size
    if width * height > limits.max_control_pixels:
        raise RequestError(f"{label} is {width}x{height} px, {too_large}")
    transparent = image.mode == "P" and "transparency" in image.info
    if image.mode not in CONTROL_MODES or transparent:
        raise RequestError(f"{label} has mode {image.mode}{' with transparency' if transparent else ''}; accepted "
                           "are RGB, L (grey), 1 (bilevel) and P without transparency: convert it to RGB first")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as err:      # a truncated or corrupt body behind a good header
        reason = " ".join(str(err).split())[:80]
        raise RequestError(f"{unreadable} ({type(err).__name__}: {reason}); send the whole file") from None
    return image.convert("RGB")


def check_environment(kind: str, network_kind: str, folder: Path, *others: Path) -> None:
    """Fail the model load with one line naming what is missing (raised from initialize, Triton shows it).
    `others`: more folders the model loads (its ControlNets')."""
    from ..errors import MissingComponent

    for path in (folder, *others):
        if not path.is_dir():
            raise MissingComponent(f"{path} is missing: the repository is incomplete; write it again with "
                                   "`toma-export export-repo --force`")
    needed = ["torch", "diffusers", "transformers"] + (["onnxruntime"] if network_kind == "onnx" else [])
    for module in needed:
        try:
            __import__(module)
        except ImportError as err:
            raise MissingComponent(f"the pipeline model needs {module} in the Python backend's environment ({err}); "
                                   f"install toma-export with its ort and serve extras (make venv) and start the "
                                   f"server with `toma-export serve`") from None
    import torch

    if (kind == "GPU" or network_kind == "engine") and not torch.cuda.is_available():
        raise MissingComponent(f"this {'TensorRT engine' if network_kind == 'engine' else 'GPU instance'} needs "
                               "CUDA, which torch cannot see here; export the repository from an ONNX export with "
                               "--kind cpu on a machine without a GPU")


class TritonPythonModel:
    """Triton's Python-backend entry points: initialize, execute, finalize."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        from .generate import Session

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value") for k, v in (config.get("parameters") or {}).items()}
        version = Path(args["model_repository"]) / args["model_version"]
        network = version / NETWORK
        # one default conditioning scale per ControlNet, in the order of a request's control images
        self.control_scales = [float(s) for s in (params.get("controlnet_scales") or "").split(",") if s]
        controlnets = [(version / control_folder(i), version / control_folder(i, baseline=True))
                       for i in range(len(self.control_scales))]
        check_environment(args.get("model_instance_kind", "CPU"), params.get("network_kind", "onnx"), network,
                          *(folder for folder, _ in controlnets))
        baseline = version / BASELINE
        from ..cache import parse

        self.session = Session(network, baseline if baseline.is_dir() else None, cache=parse(params.get("cache")),
                               controlnets=[(t, b if b.is_dir() else None) for t, b in controlnets],
                               control_modes=[m for m in (params.get("controlnet_modes") or "").split(",") if m])
        self.control_names = [(net.toma_artifact or net.baseline_artifact).model for net in self.session.controlnets]
        self.session.pipe.set_progress_bar_config(disable=True)     # one bar per request would flood the log
        self.default_guidance = float(self.session.spec.default_guidance)
        self.max_batch = int(config.get("max_batch_size") or 1)
        self.limits = Limits.from_parameters(params)
        self.name = config["name"]
        self.sizes = self.session.artifacts[0].pixel_range()    # None for engines: their profiles decide
        steered = "".join(f", ControlNet {n} at scale {s:g}" for n, s in zip(self.control_names, self.control_scales))
        print(f"[toma-export] {self.name}: {self.session.spec.name} on {self.session.network.provider}{steered}; "
              f"limits {asdict(self.limits)}", file=sys.stderr, flush=True)

    def _parse(self, request) -> tuple:
        """The request's values, every one checked against the limits and the export before any work."""
        pb, limits = self.pb, self.limits
        values = {}
        for name in INPUTS + OPTIONAL:
            tensor = pb.get_input_tensor_by_name(request, name)
            if tensor is None:
                if name in OPTIONAL:
                    continue
                raise RequestError(f"input {name} is missing")
            array = tensor.as_numpy()
            if array.size != 1:
                raise RequestError(f"input {name} has shape {list(array.shape)}; send one prompt per request "
                                   "(shape [1, 1] with the batch axis), and more requests to batch")
            values[name] = array.reshape(-1)[0]
        prompt = values["prompt"]
        prompt = prompt if isinstance(prompt, bytes) else str(prompt).encode("utf-8")
        if len(prompt) > limits.max_prompt_bytes:
            raise RequestError(f"prompt is {len(prompt)} bytes; the limit is {limits.max_prompt_bytes} bytes of UTF-8 "
                               "(config.pbtxt parameter max_prompt_bytes)")
        height, width, steps, seed = (int(values[k]) for k in ("height", "width", "steps", "seed"))
        if not 1 <= steps <= limits.max_steps:
            raise RequestError(f"steps must be in 1..{limits.max_steps}, got {steps} (export-repo --max-steps sets "
                               "the limit)")
        if not 0 <= seed <= SEED_MAX:
            raise RequestError(f"seed must be in 0..{SEED_MAX}, got {seed}")
        guidance = float(values.get("guidance", self.default_guidance))
        if not (math.isfinite(guidance) and 0 <= guidance <= limits.max_guidance):
            raise RequestError(f"guidance must be in 0..{limits.max_guidance:g}, got {guidance:g} (config.pbtxt "
                               "parameter max_guidance)")
        budget = float(values.get("max_seconds", limits.max_seconds))
        if not (math.isfinite(budget) and 0 < budget <= limits.max_seconds):
            raise RequestError(f"max_seconds must be in (0, {limits.max_seconds:g}], got {budget:g} (a request may "
                               "ask for less time than export-repo --max-seconds, not more)")
        self._check_size(height, width)
        try:
            self.session.check(height, width, steps, guidance)
        except ValueError as err:       # UsageError / ArtifactError: what the export accepts
            raise RequestError(str(err)) from None
        return prompt.decode("utf-8", "replace"), seed, (height, width, steps, guidance, budget)

    def _controls(self, request) -> list:
        """(image, scale) per ControlNet from the request's control_image and control_scale, each image decoded
        and checked (decode_control) before any work."""
        pb, count = self.pb, len(self.control_scales)
        names = ", ".join(self.control_names)
        takes = f"this model takes {count}, one PNG or JPEG per ControlNet ({names}), in that order"
        tensor = pb.get_input_tensor_by_name(request, "control_image")
        if tensor is None:
            raise RequestError(f"input control_image is missing; {takes}")
        blobs = list(tensor.as_numpy().reshape(-1))
        if len(blobs) != count:
            raise RequestError(f"control_image holds {len(blobs)} image(s); {takes}")
        scales = self.control_scales
        tensor = pb.get_input_tensor_by_name(request, "control_scale")
        if tensor is not None:
            scales = [float(s) for s in tensor.as_numpy().reshape(-1)]
            if len(scales) != count or not all(math.isfinite(s) and s >= 0 for s in scales):
                shown = ", ".join(f"{s:g}" for s in scales)
                raise RequestError(f"control_scale must hold {count} finite number(s) >= 0, one per ControlNet "
                                   f"({names}); got [{shown}] (leave it out for the defaults "
                                   f"{', '.join(f'{s:g}' for s in self.control_scales)})")
        labels = ["control_image"] if count == 1 else [f"control_image[{k}]" for k in range(count)]
        return [(decode_control(bytes(blob), label, self.limits), scale)
                for blob, label, scale in zip(blobs, labels, scales)]

    def _check_size(self, height: int, width: int) -> None:
        if self.sizes is None:
            return
        (h0, w0), (h1, w1) = self.sizes
        if not (h0 <= height <= h1 and w0 <= width <= w1):
            accepted = f"{h0}x{w0} to {h1}x{w1} px" if (h0, w0) != (h1, w1) else f"{h0}x{w0} px only"
            raise RequestError(f"height x width {height}x{width} px is outside what the export accepts: {accepted}")

    def execute(self, requests):
        from .generate import Stopped

        pb = self.pb
        invalid = pb.TritonError.INVALID_ARG
        responses = [None] * len(requests)
        groups = defaultdict(list)
        controls = {}          # request index -> [(image, scale)] per ControlNet
        for i, request in enumerate(requests):
            try:
                prompt, seed, key = self._parse(request)
                if self.control_scales:     # one pipeline call takes one control image per ControlNet: run alone
                    controls[i] = self._controls(request)
                    key = (*key, i)
                groups[key].append((i, prompt, seed))
            except RequestError as err:
                responses[i] = pb.InferenceResponse(error=pb.TritonError(str(err), invalid))
        for key, items in groups.items():
            height, width, steps, guidance, budget = key[:5]
            size = min(self.session.max_requests(guidance), self.max_batch)
            for start in range(0, len(items), size):
                chunk = items[start:start + size]
                stop = self._stop_rule([requests[i] for i, _, _ in chunk], budget)
                try:
                    images = self.session.run([p for _, p, _ in chunk], [s for _, _, s in chunk], height, width,
                                              steps, guidance, stop=stop, controls=controls.get(chunk[0][0], ()))
                except Stopped as why:
                    print(f"[toma-export] {self.name}: stopped {len(chunk)} request(s) {why}", file=sys.stderr,
                          flush=True)
                    error = (pb.TritonError(f"the request was cancelled; the pipeline stopped {why}",
                                            pb.TritonError.CANCELLED) if why.reason == "cancelled" else
                             pb.TritonError(f"the request ran past its time budget of {budget:g} s and stopped "
                                            f"after step {why.step} of {why.steps}; ask for fewer steps or a smaller "
                                            "size, or a larger max_seconds (up to export-repo --max-seconds)",
                                            pb.TritonError.UNAVAILABLE))
                    for i, _, _ in chunk:
                        responses[i] = pb.InferenceResponse(error=error)
                    continue
                except Exception as err:   # noqa: BLE001  (a server fault, a 500: the server keeps serving)
                    for i, _, _ in chunk:
                        responses[i] = pb.InferenceResponse(error=pb.TritonError(f"{type(err).__name__}: {err}"))
                    continue
                for (i, _, _), image in zip(chunk, images):
                    responses[i] = pb.InferenceResponse(output_tensors=[self._image(image)])
        return responses

    @staticmethod
    def _stop_rule(requests, budget: float):
        """Checked after every denoising step: a reason to stop, or None. A batch stops for cancellation only
        when every request in it was cancelled: the others still want their images."""
        deadline = time.monotonic() + budget

        def stop():
            if all(r.is_cancelled() for r in requests):
                return "cancelled"
            if time.monotonic() > deadline:
                return "out of time"
            return None

        return stop

    def _image(self, image):
        """UINT8 [1, H, W, 3] through DLPack: the stub rejects arrays made by NumPy 2 (as_numpy's inverse)."""
        import torch

        array = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8)[None])
        return self.pb.Tensor.from_dlpack("image", torch.from_numpy(array))

    def finalize(self):
        self.session = None
