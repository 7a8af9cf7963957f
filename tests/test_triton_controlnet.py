"""ControlNets on a real tritonserver: `export-repo --controlnet` places the ControlNet's export beside the network's,
the pipeline model takes one control image per ControlNet (`request --control-image`) and draws what the in-process
Session draws with it, and it refuses bad control images in one line before any work.

sdxl-tiny with its trained ControlNet, static 128 px: the exports tests/test_controlnet.py makes (same options, so a
whole-suite run shares them through `artifacts`), 3 steps at guidance 1 (the static exports take batch 1: no CFG).
One server for the module, serving the steered model alone; its instance runs one thread, as the reference does, so
a single request is bit-identical.

A model without ControlNets refuses control_image because its config does not declare it: a plain repository's
config is checked for that (sdxl-tiny's dynamic export, which test_triton_server serves), and Triton's refusal of an
undeclared input on the served model. Serving the plain model too would cost its load (18 s of one core)."""
import contextlib
import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import running
from PIL import Image

from toma_export.cli import main
from toma_export.onnx import ExportOptions
from toma_export.onnx.export import export_controlled
from toma_export.serve import triton_server
from toma_export.serve.triton_client import Client
from toma_export.toma import ToMAConfig

SIZE, STEPS, GUIDANCE, SCALE = 128, 3, 1.0, 0.8
PROMPT = "a blue triangle on a white background"
STEERED, PLAIN = "sdxl-steered", "sdxl-plain"
TAKES = "this model takes 1, one PNG or JPEG per ControlNet (sdxl-tiny-controlnet), in that order"


@pytest.fixture(scope="module")
def exports(artifacts):
    """sdxl-tiny taking the residuals of sdxl-tiny-controlnet, both with ToMA, static 128 px (test_controlnet's)."""
    return export_controlled("sdxl-tiny", ["sdxl-tiny-controlnet"], ToMAConfig(), artifacts / "onnx",
                             ExportOptions(height=SIZE, width=SIZE), progress=lambda m: None)


def export_repo(*args) -> dict:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export-repo", *map(str, args), "--json"]) == 0
    return json.loads(printed.getvalue())


@pytest.fixture(scope="module")
def repo(exports, dynamic_export, tmp_path_factory):
    """The steered model, its ControlNet named (found beside the network's export) at scale 0.8, in the served
    repository; a plain sdxl-tiny in another, not served."""
    out = tmp_path_factory.mktemp("triton-controlnet") / "repo"
    said = export_repo("--onnx", exports["network"]["onnx"], "--controlnet", f"sdxl-tiny-controlnet:{SCALE}",
                       "--name", STEERED, "--out", out)
    plain = export_repo("--onnx", dynamic_export("sdxl-tiny")["onnx"], "--name", PLAIN, "--out", out.with_name("plain"))
    return out, said, Path(plain["repository"]) / PLAIN


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    parts = triton_server.install(progress=lambda m: print(m, file=sys.stderr))
    log = tmp_path_factory.mktemp("triton-controlnet-log") / "server.log"
    with running(triton_server.Server(repo[0], *[triton_server.free_port() for _ in range(3)], log=log,
                                      parts=parts)) as srv:
        yield srv


@pytest.fixture(scope="module")
def control():
    """A held-out outline of the shapes world as PNG bytes."""
    from toma_export import shapes

    return encoded(shapes.sample(0, 3, size=SIZE).control(), "PNG")


@pytest.fixture(scope="module")
def reference(repo):
    """The steered model's own folders run in this process by a Session, one thread: (control PNG bytes, scale) ->
    image."""
    from toma_export.serve.generate import Session

    version = repo[0] / STEERED / "1"
    session = Session(version / "network", controlnets=[(version / "controlnet-0", None)])
    session.pipe.set_progress_bar_config(disable=True)

    def image(data: bytes, scale: float, seed: int = 2):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with Image.open(io.BytesIO(data)) as picture:
                controls = [(picture.convert("RGB"), scale)]
            out = session.run([PROMPT], [seed], SIZE, SIZE, STEPS, GUIDANCE, controls=controls)[0]
        finally:
            torch.set_num_threads(threads)
        return np.asarray(out.convert("RGB"))

    return image


def encoded(image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (the CRC made good): a few bytes, billions of pixels decoded."""
    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)                     # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))       # its CRC over type and data
    return bytes(data)


def test_export_repo_places_the_controlnet_and_declares_its_inputs(repo, exports):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    out, said, plain = repo
    (cn,) = said["controlnets"]
    assert (cn["model"], cn["scale"], cn["baseline"]) == ("sdxl-tiny-controlnet", SCALE, None)
    assert cn["onnx"] == exports["controlnets"][0]["onnx"]
    version = out / STEERED / "1"
    assert sorted(p.name for p in version.iterdir()) == ["controlnet-0", "model.py", "network"]
    assert (version / "controlnet-0" / "model.onnx").read_bytes() == open(cn["onnx"], "rb").read()
    config = text_format.Parse((out / STEERED / "config.pbtxt").read_text(), mc.ModelConfig())
    inputs = {t.name: (mc.DataType.Name(t.data_type), list(t.dims), t.optional) for t in config.input}
    assert inputs["control_image"] == ("TYPE_STRING", [-1], False)
    assert inputs["control_scale"] == ("TYPE_FP32", [-1], True)
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["controlnet_scales"] == "0.8"
    assert (params["max_control_bytes"], params["max_control_pixels"]) == (str(8 * 2 ** 20), str(4096 * 4096))
    assert config.max_batch_size == 1 and not config.HasField("dynamic_batching")     # control images run alone
    plain = text_format.Parse((plain / "config.pbtxt").read_text(), mc.ModelConfig())
    assert [t.name for t in plain.input] == ["prompt", "height", "width", "steps", "seed", "guidance", "max_seconds"]
    assert not any(k.startswith(("max_control", "controlnet")) for k in plain.parameters)


def test_a_served_control_image_draws_what_the_session_draws(server, control, reference, tmp_path, cli_here):
    """`request --control-image` gets, bit for bit, the image the in-process Session draws with that control at the
    scale export-repo set; a request's control_scale 0 (over gRPC) is the Session's at 0 and another picture; the
    same outline as a greyscale PNG draws the same image, and a JPEG is accepted."""
    (tmp_path / "control.png").write_bytes(control)
    served = tmp_path / "served.png"
    done = cli_here("request", "--url", server.http_url, "--model", STEERED, "--prompt", PROMPT, "--size",
                    f"{SIZE}x{SIZE}", "--steps", STEPS, "--guidance", GUIDANCE, "--seed", 2, "--control-image",
                    tmp_path / "control.png", "--out", served, "--json")
    assert done.returncode == 0, done.stderr
    steered = np.asarray(Image.open(served).convert("RGB"))
    assert steered.shape == (SIZE, SIZE, 3) and steered.std() > 1
    assert np.array_equal(steered, reference(control, SCALE))

    rpc = Client(server.grpc_url, "grpc", STEERED)
    unsteered = rpc.generate(PROMPT, SIZE, SIZE, STEPS, 2, GUIDANCE, control_images=[control], control_scales=[0.0])
    assert np.array_equal(unsteered, reference(control, 0.0))
    assert np.abs(unsteered.astype(int) - steered.astype(int)).max() > 50          # the control counts
    grey = encoded(Image.open(io.BytesIO(control)).convert("L"), "PNG")
    assert np.array_equal(rpc.generate(PROMPT, SIZE, SIZE, STEPS, 2, GUIDANCE, control_images=[grey]), steered)
    jpeg = encoded(Image.open(io.BytesIO(control)).convert("RGB"), "JPEG", quality=95)
    assert rpc.generate(PROMPT, SIZE, SIZE, STEPS, 2, GUIDANCE, control_images=[jpeg]).shape == (SIZE, SIZE, 3)
    rpc.close()


def test_bad_control_images_are_refused_before_any_work(server, control, reference):
    """Every refusal is a client error (HTTP 400, gRPC INVALID_ARGUMENT) whose one line names the input and what it
    accepts; an input the config does not declare is Triton's own refusal, which is how a model without ControlNets
    refuses control_image. The one steered instance then serves the right image at once."""
    import tritonclient.grpc as grpc
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    from toma_export.serve.triton_client import inputs

    client = http.InferenceServerClient(server.http_url)

    def refused(images=(), scales=None, extra=()) -> str:
        with pytest.raises(InferenceServerException) as err:
            client.infer(STEERED, inputs(http, PROMPT, SIZE, SIZE, STEPS, 1, GUIDANCE, control_images=images,
                                         control_scales=scales) + list(extra))
        assert err.value.status() == "400", err.value.message()
        assert "\n" not in err.value.message()
        return err.value.message()

    unreadable = "control_image is not a PNG or JPEG image PIL can read"
    limit = 8 * 2 ** 20
    convert = "accepted are RGB, L (grey), 1 (bilevel) and P without transparency: convert it to RGB first"
    assert refused() == f"input control_image is missing; {TAKES}"
    assert refused([control, control]) == f"control_image holds 2 image(s); {TAKES}"
    assert refused([b"not an image"]) == f"{unreadable} (UnidentifiedImageError); send the encoded file's bytes"
    assert refused([encoded(Image.new("RGB", (8, 8)), "GIF")]).startswith(unreadable)    # PIL reads it; not served
    assert refused([control[:len(control) // 2]]).startswith(f"{unreadable} (OSError")    # truncated body
    assert refused([bytes(limit + 1)]) == (f"control_image is {limit + 1} bytes; the limit is {limit} bytes per image "
                                           "(config.pbtxt parameter max_control_bytes)")
    over = ("over the limit of 16777216 pixels (config.pbtxt parameter max_control_pixels); send a smaller image (the "
            "pipeline resizes it to the request's size)")
    assert refused([claiming(5000, 5000)]) == f"control_image is 5000x5000 px, {over}"
    assert refused([claiming(100000, 100000)]) == f"control_image is {over}"           # PIL's own bomb check
    for mode, fmt, kwargs, shown in (("RGBA", "PNG", {}, "RGBA"), ("I;16", "PNG", {}, "I;16"),
                                     ("CMYK", "JPEG", {}, "CMYK"), ("P", "PNG", {"transparency": 0},
                                                                    "P with transparency")):
        assert refused([encoded(Image.new(mode, (SIZE, SIZE)), fmt, **kwargs)]) == (
            f"control_image has mode {shown}; {convert}")
    for scales, shown in (([0.5, 0.5], "0.5, 0.5"), ([-1.0], "-1"), ([float("nan")], "nan")):
        assert refused([control], scales) == (
            f"control_scale must hold 1 finite number(s) >= 0, one per ControlNet (sdxl-tiny-controlnet); got "
            f"[{shown}] (leave it out for the defaults 0.8)")
    undeclared = http.InferInput("control_mask", [1, 1], "BYTES")     # as control_image is to a plain model
    undeclared.set_data_from_numpy(np.array([[control]], dtype=object))
    assert "unexpected inference input 'control_mask'" in refused([control], extra=[undeclared])
    rpc = grpc.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as err:
        rpc.infer(STEERED, inputs(grpc, PROMPT, SIZE, SIZE, STEPS, 1, GUIDANCE, control_images=[b"GIF89a"]))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and unreadable in err.value.message()
    rpc.close()
    ok = Client(server.http_url, "http", STEERED)
    assert np.array_equal(ok.generate(PROMPT, SIZE, SIZE, STEPS, 5, GUIDANCE, control_images=[control]),
                          reference(control, SCALE, seed=5))
    ok.close()
    client.close()


def test_export_repo_refuses_what_controlnets_do_not_combine_with(exports, dynamic_export, tmp_path, cli_here):
    """Each refusal is one line before anything is written: what ControlNets do not combine with elsewhere (--cache,
    --quantize, an engine), a network and ControlNets that do not belong together, and a ControlNet export that is
    not beside the network."""
    network, cn = exports["network"]["onnx"], exports["controlnets"][0]["onnx"]
    out = tmp_path / "repo"
    cases = [
        (("--onnx", network, "--controlnet", "sdxl-tiny-controlnet", "--cache", "fbcache:0.1"),
         "First-Block Cache does not split a network that takes ControlNet residuals yet"),
        (("--onnx", network, "--controlnet", "sdxl-tiny-controlnet", "--quantize", "int8"),
         "8-bit exports with ControlNets are not supported yet"),
        (("--engine", tmp_path / "engine.json", "--controlnet", "sdxl-tiny-controlnet"),
         "ControlNets are served through ONNX Runtime so far"),
        (("--onnx", network), "takes the residuals of ControlNets (sdxl, 9 residuals); pass its ControlNets with "
                              "--controlnet NAME[:SCALE]"),
        (("--onnx", dynamic_export("sdxl-tiny")["onnx"], "--controlnet", "sdxl-tiny-controlnet"),
         "takes no ControlNet residuals; export the network with its ControlNets"),
        (("--onnx", network, "--controlnet", "flux-tiny-controlnet"),
         "flux-tiny-controlnet gives residuals ['flux', 2, 4, 0], but"),
        (("--onnx", network, "--controlnet", "sdxl-tiny"), "sdxl-tiny is not a ControlNet (a sdxl network)"),
        (("--onnx", network, "--controlnet", network), "is not a ControlNet export (it gives no residuals)"),
        (("--onnx", network, "--controlnet", "sdxl-tiny-controlnet", "--controlnet-unmerged"),
         "no export of sdxl-tiny-controlnet beside"),
        (("--onnx", network, "--controlnet", cn, "--controlnet-unmerged"), "has ToMA; drop --controlnet-unmerged"),
    ]
    for args, message in cases:
        done = cli_here("export-repo", *args, "--out", out)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert "\n" not in done.stderr.strip() and "Traceback" not in done.stderr
    assert not out.exists()
    # the ControlNet's export passed as a path, at another scale, serves too (found nowhere else)
    said = export_repo("--onnx", network, "--controlnet", f"{cn}:1.5", "--out", out)
    assert [(c["onnx"], c["scale"]) for c in said["controlnets"]] == [(cn, 1.5)]


def test_request_refuses_control_files_before_sending(tmp_path, cli_here):
    common = ("request", "--url", "127.0.0.1:9", "--prompt", "x", "--out", tmp_path / "x.png")
    done = cli_here(*common, "--control-image", tmp_path / "missing.png")
    assert done.returncode == 2 and done.stderr.strip() == (
        f"toma-export: error: --control-image {tmp_path / 'missing.png'}: No such file or directory")
    (tmp_path / "c.png").write_bytes(b"")
    done = cli_here(*common, "--control-image", tmp_path / "c.png", "--control-scale", 1, "--control-scale", 2)
    assert done.returncode == 2 and "1 --control-image and 2 --control-scale: give one scale per control image" \
        in done.stderr
