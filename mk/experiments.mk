# Paper experiments (included by the top-level Makefile). Every target takes PRESET=smoke|cpu-small|gpu|paper.
#   make table1                 run what table1 lacks (cpu-small), print + write paper_figures/tables/table1-cpu-small.*
#   make fig5b PRESET=smoke     run fig5b's runs, then rebuild paper_figures/fig5b-smoke.png from the results
#   make figures                rebuild every figure from the results store only (no runs)
#   make experiments-all        every table and figure (`make all` depends on it)
# Runs are resumable: re-running a target does only the runs that are not recorded in $(DEFTLAB_RESULTS).

PRESET ?= cpu-small
PYTHON ?= python
DEFTLAB ?= $(PYTHON) -m deftlab
RUN_FLAGS ?=

DEFT_TABLES := table1 table2 table3 table4 table5 table6 table7 table8 table9 table10 table11 table12 table13 table14
WELORE_TABLES := welore-table1 welore-table2 welore-table3 welore-table4 welore-table5 welore-table6 welore-table7
OTHER_TABLES := osd compression methods baselines
PAPER_FIGURES := fig5a fig5b fig6 fig7 welore-fig6
FIGURE_SCRIPTS := $(PAPER_FIGURES) osd
EXPERIMENT_TABLES := $(DEFT_TABLES) $(WELORE_TABLES) $(OTHER_TABLES)

.PHONY: $(EXPERIMENT_TABLES) $(PAPER_FIGURES) figures experiments-all experiments-list experiments-dry-run all

$(DEFT_TABLES) $(WELORE_TABLES) compression methods baselines:
	$(DEFTLAB) run $@ --preset $(PRESET) $(RUN_FLAGS)

osd:
	$(DEFTLAB) run $@ --preset $(PRESET) $(RUN_FLAGS)
	$(PYTHON) paper_figures/$@.py --preset $(PRESET)

$(PAPER_FIGURES):
	$(DEFTLAB) run $@ --preset $(PRESET) $(RUN_FLAGS)
	$(PYTHON) paper_figures/$@.py --preset $(PRESET)

figures:
	@set -e; for f in $(FIGURE_SCRIPTS); do $(PYTHON) paper_figures/$$f.py --preset $(PRESET); done

experiments-all: $(EXPERIMENT_TABLES) $(PAPER_FIGURES)

# The GPU kit: experiment gpu-check (its preset gpu, or smoke with ARGS=--dry-run) plus the CUDA tests and a
# table, in one script; not part of experiments-all, and no `setup` (the GPU machine has no network).
.PHONY: gpu-check
gpu-check:
	$(PYTHON) tools/gpu_check.py $(ARGS)

experiments-list:
	$(DEFTLAB) run --list

experiments-dry-run:
	@set -e; for e in $(EXPERIMENT_TABLES) $(PAPER_FIGURES); do $(DEFTLAB) run $$e --preset $(PRESET) --dry-run; done

# prerequisites only (no recipe), so a top-level `all` with its own recipe can coexist
all: experiments-all
