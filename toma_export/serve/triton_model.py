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

    def __post_init__(self):
        if min(self.max_steps, self.max_prompt_bytes) < 1 or not (self.max_seconds > 0 and self.max_guidance >= 0):
            raise ValueError(f"request limits out of range: max_steps {self.max_steps} (>= 1), max_seconds "
                             f"{self.max_seconds:g} (> 0), max_guidance {self.max_guidance:g} (>= 0), "
                             f"max_prompt_bytes {self.max_prompt_bytes} (>= 1)")

    @classmethod
    def from_parameters(cls, params: dict) -> "Limits":
        return cls(**{f.name: type(f.default)(params[f.name]) for f in fields(cls) if params.get(f.name)})

    def parameters(self) -> dict:
        return {k: str(v) for k, v in asdict(self).items()}


def check_environment(kind: str, network_kind: str, folder: Path) -> None:
    """Fail the model load with one line naming what is missing (raised from initialize, Triton shows it)."""
    from ..errors import MissingComponent

    if not folder.is_dir():
        raise MissingComponent(f"{folder} is missing: the repository is incomplete; write it again with "
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
        check_environment(args.get("model_instance_kind", "CPU"), params.get("network_kind", "onnx"), network)
        baseline = version / BASELINE
        from ..cache import parse

        self.session = Session(network, baseline if baseline.is_dir() else None, cache=parse(params.get("cache")))
        self.session.pipe.set_progress_bar_config(disable=True)     # one bar per request would flood the log
        self.default_guidance = float(self.session.spec.default_guidance)
        self.max_batch = int(config.get("max_batch_size") or 1)
        self.limits = Limits.from_parameters(params)
        self.name = config["name"]
        self.sizes = self.session.artifacts[0].pixel_range()    # None for engines: their profiles decide
        print(f"[toma-export] {self.name}: {self.session.spec.name} on {self.session.network.provider}; limits "
              f"{asdict(self.limits)}", file=sys.stderr, flush=True)

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
        for i, request in enumerate(requests):
            try:
                prompt, seed, key = self._parse(request)
                groups[key].append((i, prompt, seed))
            except RequestError as err:
                responses[i] = pb.InferenceResponse(error=pb.TritonError(str(err), invalid))
        for (height, width, steps, guidance, budget), items in groups.items():
            size = min(self.session.max_requests(guidance), self.max_batch)
            for start in range(0, len(items), size):
                chunk = items[start:start + size]
                stop = self._stop_rule([requests[i] for i, _, _ in chunk], budget)
                try:
                    images = self.session.run([p for _, p, _ in chunk], [s for _, _, s in chunk], height, width,
                                              steps, guidance, stop=stop)
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
