"""A client of the pipeline model (HTTP or gRPC, tritonclient): one prompt in, one image (H, W, 3 uint8) out."""
from __future__ import annotations

import time

import numpy as np

from ..errors import ExecutionError, MissingComponent, UsageError


def _module(protocol: str):
    if protocol not in ("http", "grpc"):
        raise UsageError(f"protocol must be http or grpc, got {protocol!r}")
    try:
        if protocol == "http":
            import tritonclient.http as client
        else:
            import tritonclient.grpc as client
    except ImportError as err:
        raise MissingComponent(f"tritonclient[{protocol}] is not installed ({err}); pip install "
                               f"'tritonclient[{protocol}]' (make venv installs it)") from None
    return client


def inputs(client, prompt: str, height: int, width: int, steps: int, seed: int, guidance: float | None = None,
           max_seconds: float | None = None, control_images=(), control_scales=None):
    """The request tensors, each [1, 1] (the batch axis and the per-request [1]); with `control_images` (encoded
    PNG or JPEG bytes, one per ControlNet) control_image [1, N], and control_scale [1, N] where scales are given."""
    tensors = []

    def add(name, array, dtype):
        t = client.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        tensors.append(t)

    add("prompt", np.array([[prompt.encode("utf-8")]], dtype=object), "BYTES")
    for name, value in (("height", height), ("width", width), ("steps", steps), ("seed", seed)):
        add(name, np.array([[value]], dtype=np.int64), "INT64")
    for name, value in (("guidance", guidance), ("max_seconds", max_seconds)):
        if value is not None:
            add(name, np.array([[value]], dtype=np.float32), "FP32")
    if control_images:
        blobs = np.empty((1, len(control_images)), dtype=object)     # bytes as they are, never an array of them
        blobs[0, :] = [bytes(b) for b in control_images]
        add("control_image", blobs, "BYTES")
    if control_scales is not None:
        add("control_scale", np.array([list(control_scales)], dtype=np.float32), "FP32")
    return tensors


RELOADING = "has no available versions"      # Triton's answer for a model it is loading again (HTTP 404)


def reloading(err) -> bool:
    """Whether a tritonclient error says the model is being loaded again: worth a retry once it is ready."""
    return RELOADING in (err.message() or "") and str(err.status()) in ("404", "StatusCode.NOT_FOUND")


class Client:
    """One connection to a server; `generate` is safe to call from one thread at a time per Client.

    While `serve` reloads a model whose worker died, Triton answers its requests with 404 "has no available
    versions"; `generate` then waits for the model to be ready again, up to `recovery_wait` seconds, and sends
    the request once more, so a recovery delays requests instead of failing them."""

    def __init__(self, url: str, protocol: str = "http", model: str | None = None, timeout: float = 600.0,
                 headers: dict | None = None, recovery_wait: float = 60.0):
        self.module = _module(protocol)
        self.protocol = protocol
        self.recovery_wait = recovery_wait
        self.waited = 0                       # requests that waited for a reload before they were answered
        self.headers = headers or None        # sent with every call (e.g. the key of Triton's restricted APIs)
        kwargs = dict(network_timeout=timeout, connection_timeout=timeout) if protocol == "http" else {}
        self.client = self.module.InferenceServerClient(url, **kwargs)
        self.model = model or self._only_model()

    def _only_model(self) -> str:
        """The pipeline model when the repository has one (the model whose config has a prompt input)."""
        try:
            index = self.client.get_model_repository_index(headers=self.headers)
        except Exception as err:      # noqa: BLE001  (connection refused, wrong protocol: the library's own types)
            raise ExecutionError(f"cannot reach a Triton server ({type(err).__name__}: {str(err)[:200]}); is "
                                 "`toma-export serve` running, and does --url name its HTTP or gRPC port?") from None
        models = [m["name"] if isinstance(m, dict) else m.name for m in
                  (index if isinstance(index, list) else index.models)]
        pipelines = [m for m in models if self._has_prompt(m)]
        if len(pipelines) != 1:
            raise UsageError(f"the server has pipeline models {pipelines or 'none'}; pass --model NAME")
        return pipelines[0]

    def _has_prompt(self, name: str) -> bool:
        try:
            meta = self.client.get_model_metadata(name, headers=self.headers)
        except Exception:             # noqa: BLE001  (not loaded)
            return False
        names = [i["name"] for i in meta["inputs"]] if isinstance(meta, dict) else [i.name for i in meta.inputs]
        return "prompt" in names

    def generate(self, prompt: str, height: int, width: int, steps: int, seed: int = 0,
                 guidance: float | None = None, max_seconds: float | None = None, control_images=(),
                 control_scales=None) -> np.ndarray:
        """The image as (H, W, 3) uint8; a server-side refusal is an ExecutionError with the server's message.
        `control_images`: the encoded files' bytes, one per ControlNet of the model; `control_scales` theirs."""
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + self.recovery_wait
        while True:
            try:
                result = self.client.infer(self.model, inputs(self.module, prompt, height, width, steps, seed,
                                                              guidance, max_seconds, control_images, control_scales),
                                           headers=self.headers)
                return result.as_numpy("image")[0]
            except InferenceServerException as err:
                if not reloading(err):
                    raise ExecutionError(f"the server refused the request: {err.message()}") from None
                if not self._wait_until_ready(deadline):
                    raise ExecutionError(f"model {self.model!r} is not loaded and was not ready within "
                                         f"{self.recovery_wait:.0f} s (a reload after its worker died takes "
                                         "seconds); see the server's log") from None
                self.waited += 1

    def _wait_until_ready(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            try:
                if self.client.is_model_ready(self.model, headers=self.headers):
                    return True
            except Exception:         # noqa: BLE001  (the library's own types; the next look decides)
                pass
            time.sleep(0.25)
        return False

    def close(self) -> None:
        self.client.close()
