# Two commands for a new user: `make demo` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo-decoder setup demo test test-slow lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m emu_lightning.demo --config configs/tiny.yaml

# The decoder stage on the newest `make demo` checkpoint.
demo-decoder: $(STAMP)
	@ckpt=$$(ls -t runs/tiny/lightning_logs/version_*/checkpoints/final.ckpt 2>/dev/null | head -1); \
	if [ -z "$$ckpt" ]; then echo "no runs/tiny/.../final.ckpt: run 'make demo' first"; exit 1; fi; \
	$(BIN)/python -m emu_lightning.demo --config configs/tiny.yaml --config configs/stages/decoder.yaml \
		--model.init_checkpoint $$ckpt

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/rices.py
	$(BIN)/python benchmarks/eval_throughput.py
	$(BIN)/python benchmarks/generation.py
	$(BIN)/python benchmarks/data_throughput.py

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
