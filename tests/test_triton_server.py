"""A real tritonserver (the binary of the nvidia-pytriton wheel, Python backend, on CPU) serving the pipeline
models that `export-repo --onnx` writes for flux-tiny and sdxl-tiny, driven with tritonclient over HTTP and
gRPC. One server for the module; the last test restarts it through `toma-export serve`.

The server parts are fetched by `toma-export serve --install` (make venv runs it; the fixture runs it too).
If they cannot be fetched or the server does not start, the tests fail with the reason: they never skip.

Reference images come from the same pipeline in this process (generate.Session, or the `generate` command
for seed 0) with one torch thread, as the server's model instances run (OMP_NUM_THREADS=1): a single
request is bit-identical. Dynamically batched requests may differ from single ones by float rounding, so
those are compared within a tolerance of 2 levels (of 255) per pixel."""
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
from PIL import Image

from toma_export.cli import main
from toma_export.serve import triton_server
from toma_export.serve.triton_client import Client

MODELS = ("flux-tiny", "sdxl-tiny")
SIZE, STEPS = (128, 128), 2          # the smallest size the tiny models' dynamic exports take
BATCH_TOLERANCE = 2                  # uint8 levels; single requests are compared bit for bit
CLI = [sys.executable, "-m", "toma_export.cli"]


@pytest.fixture(scope="module")
def parts():
    return triton_server.install(progress=lambda m: print(m, file=sys.stderr))


@pytest.fixture(scope="module")
def repo(dynamic_export, tmp_path_factory):
    """Both pipelines in one repository: flux-tiny with one instance, sdxl-tiny with two."""
    out = tmp_path_factory.mktemp("triton") / "repo"
    names = {}
    for model, instances in zip(MODELS, (1, 2)):
        meta = dynamic_export(model)
        cmd = CLI + ["export-repo", "--onnx", meta["onnx"], "--out", str(out), "--instances", str(instances), "--json"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout)
        assert result["network"] == "onnxruntime"
        names[model] = result["pipeline_model"]
    return out, names


@pytest.fixture(scope="module")
def server(parts, repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("triton-log") / "server.log"
    ports = [triton_server.free_port() for _ in range(3)]
    srv = triton_server.Server(repo[0], *ports, log=log, parts=parts)
    try:
        srv.start(timeout=600)
    except Exception:
        print(log.read_text()[-5000:], file=sys.stderr)
        raise
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(repo):
    """In-process images from the same pipelines (Session with the server's parts seed 0), one thread."""
    from toma_export.serve.generate import Session

    sessions = {}

    def image(model, seed, prompt="a red fox"):
        if model not in sessions:
            sessions[model] = Session(repo[0] / repo[1][model] / "1" / "network", parts_seed=0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            out = sessions[model].run([prompt], [seed], *SIZE, STEPS, sessions[model].spec.default_guidance)[0]
        finally:
            torch.set_num_threads(threads)
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
def test_request_matches_generate(server, repo, dynamic_export, model, protocol, tmp_path):
    """`toma-export request` returns, bit for bit, the PNG that `toma-export generate` writes (seed 0: the
    generate command seeds a tiny model's random text encoders and VAE with the request's seed)."""
    url = server.http_url if protocol == "http" else server.grpc_url
    served, local = tmp_path / "served.png", tmp_path / "local.png"
    common = ["--prompt", "a red fox", "--size", f"{SIZE[0]}x{SIZE[1]}", "--steps", str(STEPS), "--seed", "0"]
    cmd = CLI + ["request", "--url", url, "--model", repo[1][model], "--out", str(served), "--json", *common]
    done = subprocess.run(cmd + (["--grpc"] if protocol == "grpc" else []), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["height"] == SIZE[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    gen = CLI + ["generate", "--model", model, "--onnx", dynamic_export(model)["onnx"], "--out", str(local), *common]
    subprocess.run(gen, capture_output=True, text=True, check=True, env=env)
    a, b = (np.asarray(Image.open(p).convert("RGB")) for p in (served, local))
    assert a.shape == (*SIZE, 3) and a.std() > 1         # a real image, not a blank
    assert np.array_equal(a, b)


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


def test_malformed_requests_get_errors_and_the_server_keeps_serving(server, repo, reference):
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    from toma_export.serve.triton_client import inputs

    name = repo[1]["flux-tiny"]
    client = http.InferenceServerClient(server.http_url)

    def refused(tensors) -> str:
        with pytest.raises(InferenceServerException) as err:
            client.infer(name, tensors)
        return err.value.message()

    wrong_dtype = inputs(http, "a fox", *SIZE, STEPS, 1)
    wrong_dtype[1] = http.InferInput("height", [1, 1], "INT32")
    wrong_dtype[1].set_data_from_numpy(np.array([[SIZE[0]]], dtype=np.int32))
    assert "height" in refused(wrong_dtype) and "INT32" in refused(wrong_dtype)
    missing = [t for t in inputs(http, "a fox", *SIZE, STEPS, 1) if t.name() != "seed"]
    assert "seed" in refused(missing)
    assert "the profile allows" in refused(inputs(http, "a fox", 1024, 1024, STEPS, 1))
    assert "not a positive multiple of 16" in refused(inputs(http, "a fox", 120, 128, STEPS, 1))
    assert "steps must be >= 1, got -3" in refused(inputs(http, "a fox", *SIZE, -3, 1))
    # still serving, with the right image
    ok = Client(server.http_url, "http", name)
    assert np.array_equal(ok.generate("a red fox", *SIZE, STEPS, 5), reference("flux-tiny", 5))
    ok.close()
    client.close()


def test_serve_command_restarts_on_the_repository_and_stops_on_sigterm(server, repo, reference, tmp_path):
    """The module's server stops cleanly; `toma-export serve` starts a new one on the same repository, which
    serves the same image, and exits 0 on SIGTERM."""
    assert server.stop() == 0
    ports = [triton_server.free_port() for _ in range(3)]
    log = tmp_path / "serve.log"
    cmd = CLI + ["serve", "--repo", str(repo[0]), "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
                 "--metrics-port", str(ports[2])]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while b"[serve] ready" not in log.read_bytes():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready in 600 s"
            time.sleep(1)
        client = Client(f"127.0.0.1:{ports[1]}", "grpc", repo[1]["sdxl-tiny"])
        assert np.array_equal(client.generate("a red fox", *SIZE, STEPS, 9), reference("sdxl-tiny", 9))
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "[serve] stopped (status 0)" in text
    with pytest.raises(Exception):          # nothing listens any more
        Client(f"127.0.0.1:{ports[0]}", "http", repo[1]["flux-tiny"]).client.is_server_live()


def test_missing_server_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TOMA_EXPORT_TRITON_HOME", str(tmp_path / "none"))
    (tmp_path / "repo").mkdir()
    assert main(["serve", "--repo", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no tritonserver in" in err and "toma-export serve --install" in err
    assert main(["serve", "--repo", str(tmp_path / "absent")]) == 2
    assert "does not exist; write one with `toma-export export-repo`" in capsys.readouterr().err


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
                 "gpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pipeline_model"] == "fox"
    cfg = text_format.Parse((out / "fox" / "config.pbtxt").read_text(), mc.ModelConfig())
    group = cfg.instance_group[0]
    assert (cfg.name, group.count, group.kind) == ("fox", 3, mc.ModelInstanceGroup.KIND_GPU)
    assert sorted(os.listdir(out / "fox" / "1")) == ["model.py", "network"]
    assert (out / "fox" / "1" / "network" / "model.onnx").read_bytes() == Path(onnx).read_bytes()
