# histoflow: `make demo` and `make test` each do their own set-up on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2
DEMO_DIR := demo
OUTDIR ?= results
STAMP := $(VENV)/.installed
HISTOFLOW ?= $(BIN)/histoflow

.PHONY: install demo demo-cohort demo-hard test test-fast test-slow bench mlflow-ui install-profile lint clean

# The venv is rebuilt when the pinned lock file changes.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

SMK := PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --configfile config.yaml $(DEMO_DIR)/config.yaml --config outdir=$(OUTDIR)
# the report through histoflow's report plugin: no site paths or URLs under privacy.export: deidentified
REPORT := PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/histoflow report $(OUTDIR)/report.html --configfile config.yaml $(DEMO_DIR)/config.yaml --config outdir=$(OUTDIR)

# The demo cohort is built once (deterministic from the seed); `make clean` removes it.
$(DEMO_DIR)/samples.tsv: | $(STAMP)
	$(BIN)/histoflow demo-cohort --out $(DEMO_DIR) --slides 16 --seed 7

demo-cohort: $(STAMP) $(DEMO_DIR)/samples.tsv

demo: demo-cohort
	$(SMK) --cores $(CORES)
	$(REPORT)
	@$(BIN)/histoflow where --outdir $(OUTDIR)

# The small-lesion demo (issue 23; docs/mil.md "Small lesions"): 24 slides, lesions 0.5-3 % of the
# tissue in 1-4 foci, 20x and 40x mixed; its own config (written by demo-cohort) trains the SSL
# encoder at the tiles' resolution, so it takes longer than `make demo` (docs/demo.md).
HARD_DIR := demo-hard
HARD_OUT ?= results-hard
$(HARD_DIR)/samples.tsv: | $(STAMP)
	$(BIN)/histoflow demo-cohort --out $(HARD_DIR) --slides 24 --seed 23 --lesion-fraction 0.005-0.03 --mixed-mpp

demo-hard: $(STAMP) $(HARD_DIR)/samples.tsv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --configfile config.yaml $(HARD_DIR)/config.yaml --config outdir=$(HARD_OUT) --cores $(CORES)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/histoflow report $(HARD_OUT)/report.html --configfile config.yaml $(HARD_DIR)/config.yaml --config outdir=$(HARD_OUT)
	@$(BIN)/histoflow where --outdir $(HARD_OUT)

test: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q tests

# The slow tests (deselected in `make test`): every named foundation encoder materialised on CPU.
test-slow: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH nice $(BIN)/python -m pytest -q -m slow tests

bench: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python benchmarks/run_all.py

mlflow-ui: $(STAMP)
	@# the UI's GenAI/Model training switch defaults to GenAI: this link opens the training runs
	@echo "open http://127.0.0.1:5000/$$($(BIN)/python -c 'import json,sys; print(json.load(open(sys.argv[1])).get("ui_path", ""))' $(OUTDIR)/mlflow/logged.json 2>/dev/null)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(OUTDIR)/mlflow.db --host 127.0.0.1 --port 5000

install-profile:
	mkdir -p $(HOME)/.config/snakemake
	rm -rf $(HOME)/.config/snakemake/slurm
	cp -r profiles/slurm $(HOME)/.config/snakemake/slurm
	@echo "installed: snakemake --profile slurm now finds $(HOME)/.config/snakemake/slurm"
	@# a job asking for more CPUs/memory than any node has stays PENDING for ever: warn now
	@if command -v sinfo >/dev/null 2>&1; then $(HISTOFLOW) slurm-check --profile $(HOME)/.config/snakemake/slurm || true; fi

lint: demo-cohort
	$(SMK) --lint -n

clean:
	rm -rf $(OUTDIR) $(DEMO_DIR) $(HARD_OUT) $(HARD_DIR) .snakemake
