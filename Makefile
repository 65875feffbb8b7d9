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
	$(PY) -m pip install --quiet -e ".[test,trl,serve]"
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(VENV)/bin/effopd demo

# The report test renders HTML in headless Chromium (Debian's chromium). This target installs it
# with apt-get when it is missing and this runs as root; a failed install stops `make test`. Where
# it cannot be installed, CI (CI=true) stops here too, and elsewhere that one test is skipped.
browser:
	@if command -v chromium >/dev/null 2>&1; then \
		echo "chromium: $$(command -v chromium)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium for the report rendering test"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq chromium fonts-liberation >/dev/null \
			|| { echo "error: apt-get could not install chromium (see above); make test stops here" >&2; exit 1; }; \
		command -v chromium >/dev/null 2>&1 \
			|| { echo "error: chromium was installed but is not on PATH; make test stops here" >&2; exit 1; }; \
	elif [ "$${CI:-}" = true ]; then \
		echo "error: CI=true and chromium is missing, and it cannot be installed here (needs apt-get as root)" >&2; \
		exit 1; \
	else \
		echo "chromium not found and not installable here (needs apt-get as root): the report rendering test will be skipped"; \
	fi

test: $(STAMP) browser
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
