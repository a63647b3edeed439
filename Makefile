# Two commands for a new user: `make demo` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo-decoder demo-instruct demo-benchmarks chat setup demo test test-slow lint format bench clean ablate-resampler

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# DEMO_ARGS: demo options, e.g. --overwrite to replace the final weights of an earlier demo run.
DEMO_ARGS ?=

demo: $(STAMP)
	$(BIN)/python -m emu_lightning.demo --config configs/tiny.yaml --config configs/stages/pretrain.yaml $(DEMO_ARGS)

# The three training stages in order (README): pretraining (`make demo`), the decoder, instruction tuning. Each
# starts from the previous one's runs/<stage>/final.ckpt (`model.init_checkpoint` in configs/stages/).
demo-decoder: $(STAMP)
	@test -f runs/tiny/final.ckpt || { echo "no runs/tiny/final.ckpt: run 'make demo' first"; exit 1; }
	$(BIN)/python -m emu_lightning.demo --config configs/tiny.yaml --config configs/stages/decoder.yaml $(DEMO_ARGS)

demo-instruct: $(STAMP)
	@test -f runs/tiny-decoder/final.ckpt || { echo "no runs/tiny-decoder/final.ckpt: run 'make demo-decoder' first"; exit 1; }
	$(BIN)/python -m emu_lightning.demo --config configs/tiny.yaml --config configs/stages/decoder.yaml \
		--config configs/stages/instruct.yaml $(DEMO_ARGS)

# The paper's eight benchmarks on ShapesWorld (captioning, VQAv2, OK-VQA, VizWiz, VisDial, MSVD-QA, MSRVTT-QA, NExT-QA),
# each written in its real format: the demo's training, with every score before and after beside its chance level.
demo-benchmarks: $(STAMP)
	$(BIN)/python -m emu_lightning.demo --config configs/tiny.yaml --config configs/stages/pretrain.yaml \
		--config configs/eval/shapesworld-benchmarks.yaml $(DEMO_ARGS)

# The resampler ablation on the demo's budget (2,000 steps a run, no time cap), 2 seeds: 8 runs, about 1.5 hours on
# 2 CPU cores. Resumable: run it again after an interruption; finished runs are skipped. Report: runs/ablate/resampler/.
ablate-resampler: $(STAMP)
	$(BIN)/emu-lightning ablate --config configs/tiny.yaml --config configs/stages/pretrain.yaml \
		--variant configs/ablations/resampler-perceiver.yaml --variant configs/ablations/resampler-mlp.yaml \
		--variant configs/ablations/resampler-pooled.yaml --seeds 2 --out runs/ablate/resampler

chat: $(STAMP)
	$(BIN)/emu-lightning chat --ckpt runs/tiny-instruct/final.ckpt

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

# `make bench`: every benchmark in turn, each printing JSON lines; it needs nothing but a fresh clone (no `make demo`
# checkpoint: models are built with random weights, data is written to temporary folders). The sizes are reduced so
# that the whole run takes about 15 minutes on 2 busy shared cores; `make bench BENCH=full` runs each script at
# its own defaults, the sizes its docstring documents (about 25-30 minutes there). `--quick` on a script: a smoke test.
BENCH ?= short
bench_size = $(if $(filter full,$(BENCH)),,$(1))

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py $(call bench_size,--warmup 1 --steps 3 --rounds 2 --round-steps 3)
	$(BIN)/python benchmarks/rices.py $(call bench_size,--support 50000 --queries 2000 --images 500)
	$(BIN)/python benchmarks/eval_throughput.py $(call bench_size,--queries 100 --repeats 1)
	$(BIN)/python benchmarks/generation.py $(call bench_size,--repeats 3 --steps 10)
	$(BIN)/python benchmarks/data_throughput.py $(call bench_size,--rounds 3)
	$(BIN)/python benchmarks/instruct_memory.py $(call bench_size,--steps 3 --profiled-steps 2)
	$(BIN)/python benchmarks/busy_machine.py $(call bench_size,--quick)
	$(BIN)/python benchmarks/memory_plan.py $(call bench_size,--quick)
	$(BIN)/python benchmarks/visdial_scoring.py $(call bench_size,--quick)

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
