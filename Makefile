# fedbrain: every target bootstraps .venv (pinned requirements + this package) when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedbrain-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast image-test bench jobs clean help
help:
	@echo "make demo   - POC consortium of 3 synthetic hospitals: train, report (runs/)"
	@echo "make test   - the whole test suite (unit + POC end-to-end)"
	@echo "make image-test - build the server and site images and run a job in containers (podman; minutes)"
	@echo "make bench  - benchmarks -> bench/results.json, docs/benchmarks.md"
	@echo "make jobs   - re-export apps/ (the FLARE apps) and the jobs/*/ folders assembled from them"

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedbrain demo

test: $(STAMP)
	$(PY) -m pytest tests -n 2 --dist loadfile $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest tests -n 2 --dist loadfile -m "not poc" $(PYTEST_ARGS)

# Whenever docker/ or the requirements change (not in `make test`: the build installs torch).
image-test: $(STAMP)
	$(PY) -m pytest docker/test_images.py -v -s $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/run.py

jobs: $(STAMP)
	$(PY) -m fedbrain.jobs.apps .

clean:
	rm -rf runs bench/work .pytest_cache
