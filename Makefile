# `make demo` and `make test` each create .venv on first use: torch first (the local CPU wheel),
# then the package with its extras, every version pinned by constraints.txt, then the Triton Inference
# Server (`toma-export serve --install`: the pinned nvidia-pytriton wheel unpacked into ~/.cache/toma-export,
# never pip-installed, so its numpy<2 requirement stays out of .venv).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-large bench triton-load train-tiny venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[onnx,ort,report,tensorrt-rtx,triton,bench,serve,lora,quantize,test]'
	$(VENV)/bin/toma-export serve --install
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/toma-export demo
	$(VENV)/bin/toma-export build --model flux-tiny
	$(VENV)/bin/toma-export generate --model flux-tiny --no-toma --prompt "a red circle on a white background" --out out/demo.png
	$(VENV)/bin/toma-export generate --model flux-tiny --prompt "a red circle on a white background" --out out/demo-toma.png
	$(VENV)/bin/toma-export generate --model flux-tiny --merge-steps 3 --prompt "a red circle on a white background" --out out/demo-toma-every-3rd.png

# One pytest worker per core (pytest-xdist). A test module runs whole on one worker, so its module fixtures
# (a tritonserver, a bench run) start once; exports and engines are made once per run and shared by both
# workers (tests/conftest.py, docs/architecture.md "Tests"). The 15 slowest tests are listed at the end.
# lint-imports runs first: an import cycle or an import up the layers (pyproject.toml's contracts) fails the suite.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(VENV)/bin/lint-imports --no-logo --no-cache
	$(PY) -m pytest -q tests -n $(TEST_WORKERS) --dist loadfile --durations=15

# Real architectures with random weights (FLUX.1-dev cut to 1+2 ... 8+16 blocks, the full SDXL base UNet):
# export, TensorRT-RTX build and fp16 parity, each timed with its peak memory; rewrites docs/real_models/ and
# the real-models table in docs/real-size-models.md. About an hour on 2 cores and 24 GB, so CI does not run it.
test-large: $(STAMP)
	$(PY) scripts/real_models.py --out docs/real_models --readme docs/real-size-models.md

# ToMA vs baseline vs tomesd per block and backend, ToMA's overhead part by part and amortised per step;
# rewrites docs/bench/ (this machine kind's run kept in docs/bench/machines/) and the results table in docs/bench.md.
# About 15 minutes on 2 cores: the FLUX block runs at its real width 3072.
bench: $(STAMP)
	$(PY) scripts/bench.py --out docs/bench --readme docs/bench.md

# Requests/s and p50/p95 latency of the Triton pipeline model at 1, 4 and 16 clients (about a minute)
triton-load: $(STAMP)
	$(PY) scripts/triton_load.py --out docs/triton_load.json

# The tiny models' weights (toma_export/models/weights/): the shapes judge, the VAE, then flux-tiny (128 px, then
# 256 px) and sdxl-tiny side by side (two processes, half the threads each), trained from seed 0 on this machine's
# CPUs (87 minutes end to end on 2 cores, AMD EPYC, 10.3 GB peak: docs/quality.md); ends with the judge's figures.
# Then the tiny ControlNets against those networks, side by side (docs/controlnet.md), with their control figures.
train-tiny: $(STAMP)
	$(PY) -m toma_export.quality.train
	$(PY) -m toma_export.quality.train_controlnet

clean:
	rm -rf $(VENV) build *.egg-info
