# onnxbn developer entry points. Only Python 3.11 (or 3.10+) and a package registry needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# onnxruntime flavour: gpu where an NVIDIA driver is present, else cpu. Override: make ORT=cpu
ORT    ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# torch 2.13.0: a CPU wheel on CPU machines (fast to install); override with TORCH=torch==X
TORCH  ?= torch==2.13.0
OUT    ?= demo-out

.PHONY: demo test lint env clean

$(VENV)/.installed-$(ORT): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip uninstall -q -y onnxruntime onnxruntime-gpu 2>/dev/null || true
	$(PY) -m pip install -q -e ".[$(ORT),dev]"
	rm -f $(VENV)/.installed-*
	touch $@

env: $(VENV)/.installed-$(ORT)

demo: env
	$(VENV)/bin/onnxbn demo --out $(OUT)

lint: env
	$(PY) -m ruff check onnxbn tests tools
	PYRIGHT_PYTHON_IGNORE_WARNINGS=1 $(VENV)/bin/pyright -p pyproject.toml --pythonpath $(PY)

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
