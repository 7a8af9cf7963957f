"""The pipeline model that Triton's Python backend runs: prompt -> image with the toolkit's served network.

`export-repo` writes a two-line model.py that imports `TritonPythonModel` from here, so the repository holds
no copy of the denoising loop: each model instance (its own process) keeps one generate.Session, the same
pipeline and ServedNetwork that `toma-export generate` runs.

Why the network runs inside this model and not as a separate tensorrt_plan model it calls: the loop feeds
every step's ToMA destinations back into the next step, which ServedNetwork already does (and on GPU its
TensorRT runner replays CUDA graphs); a plan model would add a server round trip and a tensor copy per
step. ONNX Runtime on CPU, TensorRT on GPU.

Requests: `prompt` BYTES, `height` `width` `steps` `seed` INT64, optional `guidance` FP32, each of shape
[1] per request (the batch axis Triton adds makes it [1, 1] on the wire); `image` UINT8 [1, H, W, 3] back.
Triton's dynamic batcher hands one `execute` several requests; those with equal size, steps and guidance
run as one pipeline batch, up to what the export's batch range allows. Each run starts the ToMA schedule
afresh and every batch item gets its own destinations, so nothing passes between requests. A bad request
gets an error response and the others in the same call still run.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

INPUTS = ("prompt", "height", "width", "steps", "seed")      # guidance is optional
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
    """One request's inputs are unusable; the message goes back to its client."""


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
        self.session = Session(network, baseline if baseline.is_dir() else None,
                               parts_seed=int(params.get("parts_seed", 0)))
        self.default_guidance = float(self.session.spec.default_guidance)
        self.max_batch = int(config.get("max_batch_size") or 1)
        print(f"[toma-export] {config['name']}: {self.session.spec.name} on {self.session.network.provider}",
              file=sys.stderr, flush=True)

    def _parse(self, request) -> tuple:
        pb = self.pb
        values = {}
        for name in INPUTS + ("guidance",):
            tensor = pb.get_input_tensor_by_name(request, name)
            if tensor is None:
                if name == "guidance":
                    continue
                raise RequestError(f"input {name} is missing")
            array = tensor.as_numpy()
            if array.size != 1:
                raise RequestError(f"input {name} has shape {list(array.shape)}; send one prompt per request "
                                   "(shape [1, 1] with the batch axis), and more requests to batch")
            values[name] = array.reshape(-1)[0]
        prompt = values["prompt"]
        prompt = prompt.decode("utf-8", "replace") if isinstance(prompt, bytes) else str(prompt)
        height, width, steps, seed = (int(values[k]) for k in ("height", "width", "steps", "seed"))
        guidance = float(values.get("guidance", self.default_guidance))
        if steps < 1:
            raise RequestError(f"steps must be >= 1, got {steps}")
        if seed < 0:
            raise RequestError(f"seed must be >= 0, got {seed}")
        return prompt, seed, (height, width, steps, guidance)

    def execute(self, requests):
        pb = self.pb
        responses = [None] * len(requests)
        groups = defaultdict(list)
        for i, request in enumerate(requests):
            try:
                prompt, seed, key = self._parse(request)
                groups[key].append((i, prompt, seed))
            except RequestError as err:
                responses[i] = pb.InferenceResponse(error=pb.TritonError(str(err)))
        for (height, width, steps, guidance), items in groups.items():
            try:
                self.session.check(height, width, steps, guidance)
                size = min(self.session.max_requests(guidance), self.max_batch)
            except ValueError as err:       # UsageError / ArtifactError: the request's own fault
                for i, _, _ in items:
                    responses[i] = pb.InferenceResponse(error=pb.TritonError(str(err)))
                continue
            for start in range(0, len(items), size):
                chunk = items[start:start + size]
                try:
                    images = self.session.run([p for _, p, _ in chunk], [s for _, _, s in chunk], height, width,
                                              steps, guidance)
                except Exception as err:   # noqa: BLE001  (the server keeps serving; the client sees why)
                    for i, _, _ in chunk:
                        responses[i] = pb.InferenceResponse(error=pb.TritonError(f"{type(err).__name__}: {err}"))
                    continue
                for (i, _, _), image in zip(chunk, images):
                    responses[i] = pb.InferenceResponse(output_tensors=[self._image(image)])
        return responses

    def _image(self, image):
        """UINT8 [1, H, W, 3] through DLPack: the stub rejects arrays made by NumPy 2 (as_numpy's inverse)."""
        import torch

        array = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8)[None])
        return self.pb.Tensor.from_dlpack("image", torch.from_numpy(array))

    def finalize(self):
        self.session = None
