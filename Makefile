# `make demo` and `make test` each create .venv on first use: torch first (the local CPU wheel),
# then the package with its extras, every version pinned by constraints.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[onnx,ort,report,tensorrt-rtx,triton,test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/toma-export demo
	$(VENV)/bin/toma-export build --model flux-tiny

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
