# `make demo` and `make test` each build the local virtual environment (.venv) from nothing
# on first use, then run. On machines without an NVIDIA GPU, torch is pinned to the CPU build.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test venv clean browser

venv: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the default (CUDA) torch build"; \
		$(PY) -m pip install --quiet "torch>=2.4,<=2.14.1"; \
	else \
		echo "no GPU: installing the CPU build $(TORCH)"; \
		$(PY) -m pip install --quiet "$(TORCH)"; \
	fi
	$(PY) -m pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(VENV)/bin/effopd demo

# The report test renders HTML in headless Chromium (Debian's chromium); installed here when
# apt-get is available as root, otherwise that one test is skipped with the reason.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium for the report rendering test"; \
		apt-get update -qq && apt-get install -y -qq chromium fonts-liberation >/dev/null; \
	fi

test: $(STAMP) browser
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
