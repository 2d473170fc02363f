# `make demo` trains a small GPT on toy_data and samples from it; `make test` runs the tests.
# Both create .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build is enough for the demo and the tests; override for CUDA, e.g. TORCH=torch.
TORCH ?= torch==2.13.0
DEMO_DIR := runs/demo

.PHONY: demo test test-slow clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	rm -rf $(DEMO_DIR)
	$(BIN)/gptlab train --config configs/demo.yaml --tokenizer toy_data/tiny_sp \
		--train_data toy_data/tiny_sp_train.txt --eval_data toy_data/tiny_sp_test.txt
	@echo "---- a sample from the model ----"
	$(BIN)/gptlab generate --model_path "$$(ls -t $(DEMO_DIR)/*.pth | head -n 1)" \
		--prompt "ROMEO:" --length 200 --temperature 0.8 --seed 1

test: $(VENV)/.installed
	$(BIN)/python -m pytest

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) runs build *.egg-info
