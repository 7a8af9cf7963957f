# `make demo` and `make test` each create .venv on first use: torch first (the local CPU wheel),
# then the package with its extras, every version pinned by constraints.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[onnx,ort,report,tensorrt-rtx,triton,bench,serve,test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/toma-export demo
	$(VENV)/bin/toma-export build --model flux-tiny
	$(VENV)/bin/toma-export generate --model flux-tiny --prompt "a red fox" --steps 4 --size 256x256 --out out/fox.png

test: $(STAMP)
	$(PY) -m pytest -q tests

# ToMA vs baseline vs tomesd per block and backend; rewrites docs/bench/ and the README's results table
bench: $(STAMP)
	$(PY) scripts/bench.py --out docs/bench --readme README.md

clean:
	rm -rf $(VENV) build *.egg-info
