# `make demo` trains a small GPT on toy_data and samples from it; `make test` runs the tests.
# Both create .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build is enough for the demo and the tests; override for CUDA, e.g. TORCH=torch.
TORCH ?= torch==2.13.0
DEMO_DIR := runs/demo
SEQ2SEQ_DIR := runs/demo-seq2seq
CHAT_DIR := runs/demo-chat
CHAT_BUDGET ?= 5m

.PHONY: demo demo-seq2seq demo-chat speedrun ablation test test-gguf test-cuda test-slow lint clean

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

# An encoder-decoder Transformer learns to write dates in words as ISO dates (toy_data/seq2seq).
demo-seq2seq: $(VENV)/.installed
	rm -rf $(SEQ2SEQ_DIR)
	$(BIN)/gptlab train --model transformer --tokenizer toy_data/seq2seq/tokenizer \
		--train_data toy_data/seq2seq/train.tsv --eval_data toy_data/seq2seq/test.tsv \
		--embed_dim 64 --n_heads 4 --num_layers 2 --seq_len 12 --max_source_len 64 --dropout 0 \
		--batch_size 64 --learning_rate 3e-3 --warmup_steps 100 --epochs 10 --eval_interval 1000 --eval_batches 8 \
		--experiment_name dates --checkpoint_dir $(SEQ2SEQ_DIR) --checkpoint_every 10 --log_dir $(SEQ2SEQ_DIR)/runs --no_progress
	@echo "---- held-out style examples ----"
	@for s in "the fourth of july, nineteen seventy-six" "december 31, 1999" "1 january two thousand and one" \
		"february twenty-ninth, twenty twenty-four"; do printf '%s  ->  ' "$$s"; \
		$(BIN)/gptlab generate --model_path $(SEQ2SEQ_DIR)/dates_e10.pth --prompt "$$s" --beam_size 4; done

# A GPT learns to chat from scratch: sums, comparisons and words in capitals (toy_data/chat), then answers
# held-out questions; "exact" = its text before <|end|> equals the reference answer character for character.
demo-chat: $(VENV)/.installed
	rm -rf $(CHAT_DIR)
	$(BIN)/python toy_data/chat/make_conversations.py --out $(CHAT_DIR)/data
	$(BIN)/gptlab tokenizer train $(CHAT_DIR)/data/train.jsonl --type char --out $(CHAT_DIR)/tokenizer
	$(BIN)/gptlab train --task chat --tokenizer $(CHAT_DIR)/tokenizer \
		--train_data $(CHAT_DIR)/data/train.jsonl --eval_data $(CHAT_DIR)/data/valid.jsonl \
		--embed_dim 128 --n_heads 4 --num_layers 4 --seq_len 160 --dropout 0 --norm rmsnorm --activation relu2 \
		--no-tie_embeddings --dtype bf16 --batch_size 32 --learning_rate 3e-3 --warmup_steps 50 --epochs 100 \
		--time_budget $(CHAT_BUDGET) --eval_interval 500 --eval_batches 4 --checkpoint_every 100 \
		--experiment_name chat --checkpoint_dir $(CHAT_DIR) --log_dir $(CHAT_DIR)/runs --no_progress
	@echo "---- held-out questions ----"
	$(BIN)/gptlab eval --task chat --model_path "$$(ls -t $(CHAT_DIR)/*.pth | head -n 1)" \
		--data $(CHAT_DIR)/data/test.jsonl --show 6 --device cpu

# The speedrun: nanogpt-cpu (nanoGPT's CPU recipe) against cpu-10min, 2 seeds each, BUDGET of training per run
# (4 runs of 10 minutes by default), written to docs/speedrun.md, docs/speedrun.png and BENCHMARKS.md.
BUDGET ?= 10m
speedrun: $(VENV)/.installed
	$(BIN)/python benchmarks/speedrun.py --budget $(BUDGET) --seeds 1 2 --no_progress

# How cpu-10min was chosen at its own budget: one change at a time, ABLATION_BUDGET per row, into
# docs/ablation-<walk>.md and BENCHMARKS.md; the walks are listed in benchmarks/ablation_walks.py.
# ABLATION_WALK=smear (the latest: each token's embedding plus its predecessor's, at a
# context of 256 and of 512), unet (U-net skip connections), context (a context of 512, the head
# untied), decay (the learning rate decayed over 60 % of the run), wider (an MLP
# 5 × wide, AdamW's rate halved), unclipped (no gradient
# clipping), lighter (a narrower MLP, Muon's momentum warmup over 600 steps,
# AdamW's β1 0.6), refine (AdamW's β1 lower still, 3 heads),
# shortlist (what a sweep at a fixed step count on a GPU shortlisted,
# benchmarks/step_sweep.py), repeat (dropout, weight decay and width where the text is read
# five times), modded (a soft cap on the logits, value
# embeddings), schedule (the learning rate's decay, Muon's momentum warmup, depth at equal
# parameters), compute (what the small model sized to a slower machine spends its steps on),
# small (its learning rates), size (smaller models, for a slower machine), regularisation
# (dropout, weight decay, AdamW's learning rate), data (what each step learns from), sweeps
# (learning rate and vocabulary), faster (what faster steps are best spent on), budget (from the
# first cpu-10min) or first (`ABLATION_BUDGET=2m`: how the first was chosen).
ABLATION_BUDGET ?= 10m
ABLATION_WALK ?= smear
ablation: $(VENV)/.installed
	$(BIN)/python benchmarks/ablation.py --walk $(ABLATION_WALK) --budget $(ABLATION_BUDGET) --no_progress

# The browser test of `gptlab serve` drives Chromium through Playwright: install Debian's once.
# Where that cannot work (no apt-get), say so and go on; that one test then skips, saying why.
$(VENV)/.browser: | $(VENV)/.installed
	scripts/install_browser.sh $(BIN)/python && touch $@ || \
		echo "warning: Chromium not installed (scripts/install_browser.sh needs Debian's apt-get); the browser test will skip"

# The slowest tests are listed at the end: what to move behind the `slow` marker when the suite grows.
test: $(VENV)/.installed $(VENV)/.browser
	$(BIN)/python -m pytest --durations=15

# GGUF exports checked against llama.cpp itself. llama-cpp-python builds llama.cpp from source the
# first time (minutes of C++; pip then keeps the wheel in its cache), hence a target of its own.
LLAMA_CPP ?= llama-cpp-python==0.3.36
test-gguf: $(VENV)/.installed
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/python -m pip install -q "$(LLAMA_CPP)"
	$(BIN)/python -m pytest -m llama_cpp

# The CUDA paths (bf16, fp16, compile, the decode step, resume) on a machine with an NVIDIA GPU;
# in the default suite they skip where there is none.
test-cuda: $(VENV)/.installed
	$(BIN)/python -m pytest -m cuda -rs

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -m slow

# ruff's lint rules and formatting (configured in pyproject.toml); `ruff format .` fixes the latter.
lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs build *.egg-info
