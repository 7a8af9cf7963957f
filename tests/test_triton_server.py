"""A real tritonserver (the binary of the nvidia-pytriton wheel, Python backend, on CPU) serving the pipeline
models that `export-repo --onnx` writes for flux-tiny and sdxl-tiny, driven with tritonclient over HTTP and
gRPC. One server for the module, killed into recovery by its last test; `toma-export serve` starts a second
one on the same repository before that.

The server parts are fetched by `toma-export serve --install` (make venv runs it; the fixture runs it too).
If they cannot be fetched or the server does not start, the tests fail with the reason: they never skip.

Reference images come from the same pipeline in this process (generate.Session, or the `generate` command)
with one torch thread, as the server's model instances run (OMP_NUM_THREADS=1): a single
request is bit-identical. Dynamically batched requests may differ from single ones by float rounding, so
those are compared within a tolerance of 2 levels (of 255) per pixel."""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import pipeline_image, running
from PIL import Image

from toma_export.cli import main
from toma_export.serve import triton_server
from toma_export.serve.triton_client import Client

MODELS = ("flux-tiny", "sdxl-tiny")
SIZE, STEPS = (128, 128), 2          # the smallest size the tiny models' dynamic exports take
BATCH_TOLERANCE = 2                  # uint8 levels; single requests are compared bit for bit
PYTORCH_TOLERANCE = 4                # uint8 levels between the server and the PyTorch pipeline (measured max 1)
LONG_STEPS = 1000                    # flux-tiny's step limit in this repository
CLI = [sys.executable, "-m", "toma_export.cli"]
CACHE = "fbcache:0.2"      # caches about half of 12 steps


@pytest.fixture(scope="module")
def parts():
    return triton_server.install(progress=lambda m: print(m, file=sys.stderr))


@pytest.fixture(scope="module")
def repo(dynamic_export, artifacts, tmp_path_factory):
    """Both pipelines in one repository: flux-tiny with one instance, sdxl-tiny with two; and flux-tiny split for
    First-Block Cache (static, 128x128), served with it."""
    from toma_export import ToMAConfig
    from toma_export.onnx import ExportOptions
    from toma_export.onnx.export import export_split

    def export_repo(*args) -> dict:                  # the command, run in this process
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(["export-repo", *map(str, args), "--out", str(out), "--json"]) == 0
        return json.loads(printed.getvalue())

    out = tmp_path_factory.mktemp("triton") / "repo"
    names = {}
    tail = export_split("flux-tiny", ToMAConfig(), artifacts / "onnx", ExportOptions(height=SIZE[0], width=SIZE[1]),
                        progress=lambda m: None)
    names["flux-tiny-fbcache"] = export_repo("--onnx", tail["onnx"], "--name", "flux-tiny-fbcache", "--cache",
                                             CACHE)["pipeline_model"]
    names["flux-tiny-fbcache-tail"] = tail["onnx"]
    for model, instances in zip(MODELS, (1, 2)):
        # flux-tiny's step limit: long enough to cancel or run out of time (about 30 steps/s at 512 px)
        steps = ["--max-steps", LONG_STEPS] if model == "flux-tiny" else []
        result = export_repo("--onnx", dynamic_export(model)["onnx"], "--instances", instances, *steps)
        assert result["network"] == "onnxruntime"
        names[model] = result["pipeline_model"]
    return out, names


@pytest.fixture(scope="module")
def said():
    """What the module's server said while it ran (its watchdog's lines)."""
    return []


@pytest.fixture(scope="module")
def server(parts, repo, said, tmp_path_factory):
    """The module's server. Its last test kills a worker mid-request, and Triton never frees that instance, so
    its shutdown waits for the exit timeout: 5 s here."""
    log = tmp_path_factory.mktemp("triton-log") / "server.log"
    ports = [triton_server.free_port() for _ in range(3)]
    with running(triton_server.Server(repo[0], *ports, log=log, parts=parts, progress=said.append,
                                      extra_args=["--exit-timeout-secs=5"])) as srv:
        yield srv


@contextlib.contextmanager
def one_thread():
    """torch on one thread, as each of the server's model instances runs (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(repo):
    """In-process images from the same pipelines (Session), one thread."""
    from toma_export.serve.generate import Session

    sessions = {}

    def image(model, seed, prompt="a red fox"):
        if model not in sessions:
            sessions[model] = Session(repo[0] / repo[1][model] / "1" / "network")
        with one_thread():
            out = sessions[model].run([prompt], [seed], *SIZE, STEPS, sessions[model].spec.default_guidance)[0]
        return np.asarray(out.convert("RGB"))

    return image


def test_server_loads_the_repository(server, repo):
    client = Client(server.http_url, "http", repo[1]["flux-tiny"])
    for model in MODELS:
        assert client.client.is_model_ready(repo[1][model])
        config = client.client.get_model_config(repo[1][model])
        assert config["backend"] == "python" and config["instance_group"][0]["kind"] == "KIND_CPU"
    sdxl = client.client.get_model_config(repo[1]["sdxl-tiny"])
    assert sdxl["instance_group"][0]["count"] == 2
    # the dynamic export batches up to 4 samples: FLUX (no CFG) 4 requests, SDXL (CFG pairs) 2
    assert client.client.get_model_config(repo[1]["flux-tiny"])["max_batch_size"] == 4
    assert sdxl["max_batch_size"] == 2 and "dynamic_batching" in sdxl
    client.close()


@pytest.mark.parametrize("model,protocol", [("flux-tiny", "http"), ("sdxl-tiny", "grpc")])
def test_request_matches_generate(server, repo, dynamic_export, model, protocol, tmp_path, cli_here):
    """`toma-export request` returns, bit for bit, the PNG that `toma-export generate` writes, at a seed other
    than 0 (the seed seeds the noise alone). Both commands run in this process."""
    url = server.http_url if protocol == "http" else server.grpc_url
    served, local = tmp_path / "served.png", tmp_path / "local.png"
    common = ["--prompt", "a red fox", "--size", f"{SIZE[0]}x{SIZE[1]}", "--steps", str(STEPS), "--seed", "3"]
    done = cli_here("request", "--url", url, "--model", repo[1][model], "--out", served, "--json", *common,
                    *(["--grpc"] if protocol == "grpc" else []))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["height"] == SIZE[0]
    with one_thread():
        done = cli_here("generate", "--model", model, "--onnx", dynamic_export(model)["onnx"], "--out", local, *common)
    assert done.returncode == 0, done.stderr
    a, b = (np.asarray(Image.open(p).convert("RGB")) for p in (served, local))
    assert a.shape == (*SIZE, 3) and a.std() > 1         # a real image, not a blank
    assert np.array_equal(a, b)


@pytest.mark.parametrize("model", MODELS)
def test_the_server_draws_what_the_pytorch_pipeline_draws(server, repo, model):
    """Each served image is load_pipeline's with PyTorch ToMA for its prompt and seed (seeds 0, 3 and 5), up to
    ONNX Runtime's rounding: the reference shares no serving code with the server."""
    import toma_export as te
    from toma_export.serve import load_pipeline

    prompt = "a blue square on a white background"
    pipe = load_pipeline(model)
    te.apply_toma(pipe, te.ToMAConfig())
    pipe.set_progress_bar_config(disable=True)
    client = Client(server.http_url, "http", repo[1][model])
    for seed in (0, 3, 5):
        expected = pipeline_image(pipe, model, prompt, seed, SIZE[0], STEPS)
        served = client.generate(prompt, *SIZE, STEPS, seed)
        assert np.abs(served.astype(int) - expected.astype(int)).max() <= PYTORCH_TOLERANCE, seed
    client.close()


def test_a_first_block_cache_pipeline_serves_what_generate_draws(server, repo, tmp_path, cli_here):
    """The pipeline model of a head/tail split with its cache parameter: bit for bit what `generate --onnx TAIL
    --cache` draws in one thread."""
    name = repo[1]["flux-tiny-fbcache"]
    config = Client(server.http_url, "http", name).client.get_model_config(name)
    assert config["parameters"]["cache"]["string_value"] == CACHE
    served, local = tmp_path / "served.png", tmp_path / "local.png"
    common = ["--prompt", "a red circle on a white background", "--size", "128x128", "--steps", "12", "--seed", "4"]
    done = cli_here("request", "--url", server.http_url, "--model", name, "--out", served, *common)
    assert done.returncode == 0, done.stderr
    with one_thread():
        done = cli_here("generate", "--model", "flux-tiny", "--onnx", repo[1]["flux-tiny-fbcache-tail"], "--cache",
                        CACHE, "--out", local, "--json", *common)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert 0 < result["cached_steps"] < 12
    a, b = (np.asarray(Image.open(p).convert("RGB")) for p in (served, local))
    assert a.std() > 1 and np.array_equal(a, b)


@pytest.mark.parametrize("model", MODELS)
def test_concurrent_requests(server, repo, reference, model):
    """16 requests from 4 clients at once (2 HTTP, 2 gRPC): all complete, each image is its seed's, no two
    alike; the server batched some of them."""
    seeds = list(range(100, 116))
    images, errors = {}, []
    stats = Client(server.http_url, "http", repo[1][model])
    before = stats.client.get_inference_statistics(repo[1][model])["model_stats"][0]

    def worker(k):
        client = Client(server.http_url if k % 2 else server.grpc_url, "http" if k % 2 else "grpc", repo[1][model])
        try:
            for seed in seeds[k::4]:
                images[seed] = client.generate("a red fox", *SIZE, STEPS, seed)
        except Exception as err:   # noqa: BLE001  (reported below)
            errors.append(err)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors and sorted(images) == seeds
    for seed in seeds:
        expected = reference(model, seed)
        assert images[seed].shape == expected.shape
        assert np.abs(images[seed].astype(int) - expected.astype(int)).max() <= BATCH_TOLERANCE, seed
    flat = {images[s].tobytes() for s in seeds}
    assert len(flat) == len(seeds)
    after = stats.client.get_inference_statistics(repo[1][model])["model_stats"][0]
    requests = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert requests == 16 and executions < 16, (requests, executions)
    stats.close()


def _with_budget(module, tensors, seconds):
    budget = module.InferInput("max_seconds", [1, 1], "FP32")
    budget.set_data_from_numpy(np.array([[seconds]], dtype=np.float32))
    return tensors + [budget]


def test_malformed_requests_get_errors_and_the_server_keeps_serving(server, repo, reference):
    """Client mistakes are client errors (HTTP 400, gRPC INVALID_ARGUMENT) whose one line names the input and
    what it accepts, refused before any work: a 65536x65536 request allocates nothing and steps=10^6 runs
    nothing, so the one flux-tiny instance answers the next request at once."""
    import tritonclient.grpc as grpc
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    from toma_export.serve.triton_client import inputs

    name = repo[1]["flux-tiny"]
    client = http.InferenceServerClient(server.http_url)
    rpc = grpc.InferenceServerClient(server.grpc_url)

    def refused(tensors, status="400") -> str:
        with pytest.raises(InferenceServerException) as err:
            client.infer(name, tensors)
        assert err.value.status() == status, err.value.message()
        assert "\n" not in err.value.message()
        return err.value.message()

    wrong_dtype = inputs(http, "a fox", *SIZE, STEPS, 1)
    wrong_dtype[1] = http.InferInput("height", [1, 1], "INT32")
    wrong_dtype[1].set_data_from_numpy(np.array([[SIZE[0]]], dtype=np.int32))
    assert "height" in refused(wrong_dtype) and "INT32" in refused(wrong_dtype)
    missing = [t for t in inputs(http, "a fox", *SIZE, STEPS, 1) if t.name() != "seed"]
    assert "seed" in refused(missing)
    for size in ((1024, 1024), (65536, 65536), (64, 128)):
        assert refused(inputs(http, "a fox", *size, STEPS, 1)) == (
            f"height x width {size[0]}x{size[1]} px is outside what the export accepts: 128x128 to 512x512 px")
    assert "not a positive multiple of 16" in refused(inputs(http, "a fox", 200, 128, STEPS, 1))
    for steps in (-3, 0, LONG_STEPS + 1, 10 ** 6):
        assert refused(inputs(http, "a fox", *SIZE, steps, 1)) == (
            f"steps must be in 1..{LONG_STEPS}, got {steps} (export-repo --max-steps sets the limit)")
    assert refused(inputs(http, "a fox", *SIZE, STEPS, -1)) == f"seed must be in 0..{2 ** 63 - 1}, got -1"
    for guidance, shown in ((-1.0, "-1"), (31.0, "31"), (float("nan"), "nan"), (float("inf"), "inf")):
        assert refused(inputs(http, "a fox", *SIZE, STEPS, 1, guidance)) == (
            f"guidance must be in 0..30, got {shown} (config.pbtxt parameter max_guidance)")
    assert refused(inputs(http, "x" * 2049, *SIZE, STEPS, 1)) == (
        "prompt is 2049 bytes; the limit is 2048 bytes of UTF-8 (config.pbtxt parameter max_prompt_bytes)")
    assert "max_seconds must be in (0, 300]" in refused(_with_budget(http, inputs(http, "a fox", *SIZE, STEPS, 1), 301))
    with pytest.raises(InferenceServerException) as err:           # the same over gRPC
        rpc.infer(name, inputs(grpc, "a fox", *SIZE, 10 ** 6, 1))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "steps must be in 1..1000" in err.value.message()
    # still serving, with the right image
    ok = Client(server.http_url, "http", name)
    assert np.array_equal(ok.generate("a red fox", *SIZE, STEPS, 5), reference("flux-tiny", 5))
    ok.close()
    rpc.close()
    client.close()


def _log_line(server, text, timeout=120) -> str:
    """The first new server log line holding `text` (the log is written as the server goes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in Path(server.log).read_text(errors="replace").splitlines() if text in line]
        if lines:
            return lines[-1]
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} in the server log after {timeout} s")


def test_a_cancelled_or_overdue_request_stops_and_frees_the_instance(server, repo, reference):
    """A gRPC client cancels a 1000-step request: the loop stops after the step it is in, and the one flux-tiny
    instance serves the next request. A request whose time budget (max_seconds, here 0.5 s) runs out stops
    the same way and gets a retryable 503 naming the budget and the step."""
    import tritonclient.grpc as grpc
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    from toma_export.serve.triton_client import inputs

    name = repo[1]["flux-tiny"]
    rpc = grpc.InferenceServerClient(server.grpc_url)
    call = rpc.async_infer(name, inputs(grpc, "a fox", 512, 512, LONG_STEPS, 3), callback=lambda result, error: None)
    time.sleep(1.0)                                  # it is running: nothing else is queued on this instance
    call.cancel()
    line = _log_line(server, "request(s) cancelled after step")
    step = int(line.split("after step ")[1].split()[0])
    assert 0 < step < LONG_STEPS and line.endswith(f"of {LONG_STEPS}")
    ok = Client(server.http_url, "http", name)
    assert np.array_equal(ok.generate("a red fox", *SIZE, STEPS, 5), reference("flux-tiny", 5))

    client = http.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException) as err:
        client.infer(name, _with_budget(http, inputs(http, "a fox", 512, 512, LONG_STEPS, 4), 0.5))
    assert err.value.status() == "503", err.value.message()
    message = err.value.message()
    assert message.startswith("the request ran past its time budget of 0.5 s and stopped after step ")
    assert int(message.split("after step ")[1].split()[0]) < LONG_STEPS
    assert np.array_equal(ok.generate("a red fox", *SIZE, STEPS, 5), reference("flux-tiny", 5))
    ok.close()
    client.close()
    rpc.close()


def test_the_server_listens_on_loopback_unless_told_otherwise(server, parts, repo, capsys):
    """HTTP, gRPC and metrics are bound to 127.0.0.1 (the kernel's table of listening sockets says so);
    --address 0.0.0.0 binds every interface on purpose, and a host name is refused in one line."""
    import ipaddress

    def address(hex_words: str):                       # /proc/net/tcp*: 32-bit words in host (little) byte order
        raw = b"".join(bytes.fromhex(hex_words[i:i + 8])[::-1] for i in range(0, len(hex_words), 8))
        ip = ipaddress.ip_address(raw)
        return getattr(ip, "ipv4_mapped", None) or ip

    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            if state == "0A":                                  # LISTEN
                where, port = local.split(":")
                listening.setdefault(int(port, 16), set()).add(address(where))
    for port in server.ports.values():
        assert listening.get(port) == {ipaddress.ip_address("127.0.0.1")}, (port, listening.get(port))
    assert server.http_url.startswith("127.0.0.1:")
    everywhere = triton_server.Server(repo[0], 1, 2, 3, parts=parts, address="0.0.0.0")
    command = everywhere.command()
    for flag in ("--http-address", "--grpc-address", "--metrics-address"):
        assert f"{flag}=0.0.0.0" in command
    assert everywhere.http_url == "127.0.0.1:1"
    assert main(["serve", "--repo", str(repo[0]), "--address", "my-host"]) == 2
    assert capsys.readouterr().err.strip() == ("toma-export: error: --address 'my-host' is not an IP address; pass "
                                               "127.0.0.1 (this machine only, the default) or 0.0.0.0 (every "
                                               "interface)")


def test_serve_command_serves_the_models_asked_for_and_stops_on_sigterm(repo, reference, tmp_path):
    """`toma-export serve --model` starts a second server on the module's repository (beside the module's, idle
    meanwhile) with only sdxl-tiny loaded, and Triton's restricted gRPC inference passed through --server-arg:
    it serves the same image to a client that sends the key and refuses one that does not, and exits 0 on
    SIGTERM, its server stopped cleanly."""
    from toma_export.errors import ExecutionError

    ports = [triton_server.free_port() for _ in range(3)]
    log = tmp_path / "serve.log"
    cmd = CLI + ["serve", "--repo", str(repo[0]), "--model", repo[1]["sdxl-tiny"], "--http-port", str(ports[0]),
                 "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
                 "--server-arg=--grpc-restricted-protocol=inference:x-api-key=SECRET"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while b"[serve] ready" not in log.read_bytes():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready in 600 s"
            time.sleep(1)
        key = {"triton-grpc-protocol-x-api-key": "SECRET"}          # gRPC metadata keys carry Triton's prefix
        client = Client(f"127.0.0.1:{ports[1]}", "grpc", repo[1]["sdxl-tiny"], headers=key)
        assert np.array_equal(client.generate("a red fox", *SIZE, STEPS, 9), reference("sdxl-tiny", 9))
        client.close()
        stranger = Client(f"127.0.0.1:{ports[1]}", "grpc", repo[1]["sdxl-tiny"])
        with pytest.raises(ExecutionError, match="x-api-key"):
            stranger.generate("a red fox", *SIZE, STEPS, 9)
        stranger.close()
        loaded = Client(f"127.0.0.1:{ports[0]}", "http", repo[1]["sdxl-tiny"])
        assert loaded.client.is_model_ready(repo[1]["sdxl-tiny"])
        assert not loaded.client.is_model_ready(repo[1]["flux-tiny"])               # not asked for: not loaded
        loaded.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "[serve] stopped (status 0)" in text and "[serve] ready on 127.0.0.1 only" in text
    with pytest.raises(Exception):          # nothing listens any more
        Client(f"127.0.0.1:{ports[0]}", "http", repo[1]["flux-tiny"]).client.is_server_live()


def test_a_dead_worker_is_reloaded_and_readiness_says_so(server, said, repo, reference):
    """The flux-tiny worker process is killed (SIGKILL, as the out-of-memory killer does) while it runs a
    request. Readiness turns false; the request in flight gets an error, not a hang; a request arriving
    meanwhile gets Triton's 404 "has no available versions", which the toolkit's client waits out; the
    watchdog has the model serving again, with the right image, within 60 s; sdxl-tiny's workers are left
    alone. A reload that fails is tried again until it works, and a model an operator unloads on purpose
    stays unloaded. The module's server, so this is its last test: Triton never frees the instance that died
    mid-request, so its shutdown waits for the exit timeout (5 s, set by the fixture)."""
    import urllib.request

    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    from toma_export.serve import recovery
    from toma_export.serve.triton_client import inputs, reloading

    srv, flux, sdxl = server, repo[1]["flux-tiny"], repo[1]["sdxl-tiny"]
    assert not said and not srv.recoveries
    stubs = recovery.workers(srv.process.pid)
    assert len(stubs[flux]) == 1 and len(stubs[sdxl]) == 2
    outcome = {}

    def in_flight():
        client = Client(srv.http_url, "http", flux, timeout=120)
        try:
            outcome["image"] = client.generate("a fox", 512, 512, LONG_STEPS, 3)
        except Exception as err:          # noqa: BLE001  (asserted below)
            outcome["error"] = str(err)
        client.close()

    thread = threading.Thread(target=in_flight)
    thread.start()
    time.sleep(1.0)                        # it is running: 1000 steps at 512 px take half a minute
    os.kill(stubs[flux][0], signal.SIGKILL)
    killed = time.monotonic()
    while srv.model_ready(flux):
        assert time.monotonic() - killed < 5, "still ready 5 s after its worker died"
        time.sleep(0.05)
    plain = http.InferenceServerClient(srv.http_url)
    with pytest.raises(InferenceServerException) as err:
        plain.infer(flux, inputs(http, "a red fox", *SIZE, STEPS, 5))
    assert err.value.status() == "404" and reloading(err.value), err.value.message()
    waiting = Client(srv.http_url, "http", flux)          # waits for the reload, then is answered
    assert np.array_equal(waiting.generate("a red fox", *SIZE, STEPS, 5), reference("flux-tiny", 5))
    assert time.monotonic() - killed < 60 and srv.model_ready(flux)
    thread.join(60)
    assert not thread.is_alive() and "image" not in outcome
    assert "is not healthy" in outcome["error"]
    assert [r["model"] for r in srv.recoveries] == [flux] and srv.recoveries[0]["lost"] == stubs[flux]
    after = recovery.workers(srv.process.pid)
    assert after[sdxl] == stubs[sdxl] and len(after[flux]) == 1 and after[flux] != stubs[flux]
    assert said[0].startswith(f"[serve] {flux}: worker process {stubs[flux][0]} died; reloading")
    assert said[1].startswith(f"[serve] {flux}: serving again ")

    # a reload that fails (the network folder is gone) is tried again, with the model not ready meanwhile
    network = repo[0] / flux / "1" / "network"
    network.rename(network.with_name("away"))
    try:
        os.kill(after[flux][0], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while not any("reloading failed" in line for line in said):
            assert time.monotonic() < deadline, said
            time.sleep(0.2)
        assert not srv.model_ready(flux) and "repository is incomplete" in said[-1]
    finally:
        network.with_name("away").rename(network)
    deadline = time.monotonic() + 120
    while len(srv.recoveries) < 2:
        assert time.monotonic() < deadline, said
        time.sleep(0.2)
    assert srv.recoveries[1]["tries"] >= 2 and any(line.endswith("(try 2)") for line in said)
    assert np.array_equal(waiting.generate("a red fox", *SIZE, STEPS, 5), reference("flux-tiny", 5))

    urllib.request.urlopen(urllib.request.Request(f"http://{srv.http_url}/v2/repository/models/{sdxl}/unload",
                                                  data=b"{}", method="POST"), timeout=60).close()
    deadline = time.monotonic() + 30                      # unload answers before the workers are gone
    while sdxl in recovery.workers(srv.process.pid):
        assert time.monotonic() < deadline, "sdxl-tiny's workers still there 30 s after the unload"
        time.sleep(0.2)
    time.sleep(2 * recovery.CHECK_EVERY + 1)
    assert not srv.model_ready(sdxl) and len(srv.recoveries) == 2
    assert sdxl not in recovery.workers(srv.process.pid)
    plain.close()
    waiting.close()
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 30


def test_recovery_options_are_checked(parts, repo):
    """serve sets the model control mode itself, unless recovery is off; the watchdog sends the key of a
    restricted repository API."""
    from toma_export.errors import UsageError
    from toma_export.serve.recovery import repository_headers

    with pytest.raises(UsageError, match="--model-control-mode is set by serve itself .* pass --no-recover"):
        triton_server.Server(repo[0], 1, 2, 3, parts=parts, extra_args=["--model-control-mode=poll"])
    own = triton_server.Server(repo[0], 1, 2, 3, parts=parts, extra_args=["--model-control-mode=poll"], recover=False)
    assert "--model-control-mode=explicit" not in own.command() and "--model-control-mode=poll" in own.command()
    assert "--model-control-mode=explicit" in triton_server.Server(repo[0], 1, 2, 3, parts=parts).command()
    sdxl = repo[1]["sdxl-tiny"]
    for recover in (True, False):                       # some models: explicit control, with or without recovery
        command = triton_server.Server(repo[0], 1, 2, 3, parts=parts, recover=recover, models=[sdxl]).command()
        assert "--model-control-mode=explicit" in command and f"--load-model={sdxl}" in command
        assert "--load-model=*" not in command
    with pytest.raises(UsageError, match=r"--model nope: no such model in .* \(it holds .*sdxl-tiny"):
        triton_server.Server(repo[0], 1, 2, 3, parts=parts, models=["nope"])
    with pytest.raises(UsageError, match="--model loads the named models with explicit model control"):
        triton_server.Server(repo[0], 1, 2, 3, parts=parts, recover=False, models=[sdxl],
                             extra_args=["--model-control-mode=poll"])
    assert repository_headers(["--http-restricted-api=inference,model-repository:x-key=S3"]) == {"x-key": "S3"}
    assert repository_headers(["--http-restricted-api=inference:x-key=S3", "--exit-timeout-secs=5"]) == {}


def test_missing_server_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TOMA_EXPORT_TRITON_HOME", str(tmp_path / "none"))
    (tmp_path / "repo").mkdir()
    assert main(["serve", "--repo", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no tritonserver in" in err and "toma-export serve --install" in err
    assert main(["serve", "--repo", str(tmp_path / "absent")]) == 2
    assert "does not exist; write one with `toma-export export-repo`" in capsys.readouterr().err
    assert main(["request", "--prompt", "x", "--out", str(tmp_path / "x.png"), "--header", "x-api-key"]) == 2
    assert capsys.readouterr().err.strip() == "toma-export: error: --header takes KEY=VALUE, got 'x-api-key'"


def test_the_pipeline_model_checks_its_environment(tmp_path):
    """What initialize raises (and Triton reports as the load failure): one line naming the fix."""
    from toma_export.errors import MissingComponent
    from toma_export.serve.triton_model import check_environment

    with pytest.raises(MissingComponent, match="repository is incomplete; write it again with `toma-export "
                                               "export-repo --force`"):
        check_environment("CPU", "onnx", tmp_path / "network")
    check_environment("CPU", "onnx", tmp_path)                 # everything here
    if not torch.cuda.is_available():
        with pytest.raises(MissingComponent, match="needs CUDA, which torch cannot see here"):
            check_environment("CPU", "engine", tmp_path)


def test_export_repo_refuses_to_overwrite_and_writes_the_options(repo, dynamic_export, tmp_path, capsys):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    onnx = dynamic_export("flux-tiny")["onnx"]
    before = sorted(os.listdir(repo[0]))
    assert main(["export-repo", "--onnx", onnx, "--out", str(repo[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "flux-tiny already exists; pass --force to replace it" in err
    assert sorted(os.listdir(repo[0])) == before                  # nothing staged or half-written left
    out = tmp_path / "r"
    assert main(["export-repo", "--onnx", onnx, "--out", str(out), "--name", "fox", "--instances", "3", "--kind",
                 "gpu", "--max-steps", "40", "--max-seconds", "12.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pipeline_model"] == "fox"
    cfg = text_format.Parse((out / "fox" / "config.pbtxt").read_text(), mc.ModelConfig())
    group = cfg.instance_group[0]
    assert (cfg.name, group.count, group.kind) == ("fox", 3, mc.ModelInstanceGroup.KIND_GPU)
    limits = {k: v.string_value for k, v in cfg.parameters.items() if k.startswith("max_")}
    assert limits == dict(max_steps="40", max_seconds="12.5", max_guidance="30.0", max_prompt_bytes="2048")
    assert [i.name for i in cfg.input if i.optional] == ["guidance", "max_seconds"]
    assert main(["export-repo", "--onnx", onnx, "--out", str(tmp_path / "none"), "--max-steps", "0"]) == 2
    assert "pass --max-steps N >= 1" in capsys.readouterr().err and not (tmp_path / "none").exists()
    assert sorted(os.listdir(out / "fox" / "1")) == ["model.py", "network"]
    assert (out / "fox" / "1" / "network" / "model.onnx").read_bytes() == Path(onnx).read_bytes()
