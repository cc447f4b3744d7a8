# The book's two commands:  make book  (build the site)   make test  (run every test)
# and one to run a chapter:  make run PAPER=00 PRESET=book [ARGS="-p name=value ..."]
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# the environment is rebuilt when what it is made from changes
ENV_STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -c1-16)
PAPER ?= 00
PRESET ?= book
ARGS ?=

# the book runs offline, the way a reader's laptop may be; only the paper preset reaches the hub
ifneq ($(PRESET),paper)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
endif
# the AVX2 code of torch, oneDNN and MKL on every x86 machine, so a rerun on an AVX-512 CPU sums floats
# as the committed results did (runner.CPU_PINS in lib/replbook/runner.py says why, and is the list
# tests/test_cli.py holds this one to); override any of them on the command line
ATEN_CPU_CAPABILITY ?= avx2
ONEDNN_MAX_CPU_ISA ?= AVX2
MKL_ENABLE_INSTRUCTIONS ?= AVX2
export ATEN_CPU_CAPABILITY ONEDNN_MAX_CPU_ISA MKL_ENABLE_INSTRUCTIONS
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# pip on some machines warns about every missing local index folder: keep the log readable
QUIET_PIP := { grep -v '^WARNING: Location' || true; }

.PHONY: help env browser book test run scoreboard guard-proofs nbval-by-hand refactor-proof mutants clean

help:
	@echo "make book    create .venv if missing, prepare models and data, execute chapters with no results, build the site"
	@echo "make test    unit + kernel tests, smoke runs, nbval, the site build and its rendering"
	@echo "make run PAPER=00 PRESET=book [ARGS='-p name=value']   run one chapter with papermill"
	@echo "make guard-proofs   (by hand) re-run 00, 03, 09, 10 with an injected bug; record that the guard fails"
	@echo "make nbval-by-hand  (by hand) re-execute 01, 02, 06, 07 and 10 under nbval and the guard; record that they pass"
	@echo "make mutants        (by hand) apply each wrong implementation in tests/mutants/ whose inputs changed; record that a test fails"

env: $(ENV_STAMP)

# the interpreter the environment is made from: 3.11.4 or later, whose tarfile has the
# extraction filters the data archives are unpacked with (Debian 12's python3 is 3.11.2:
# `make test` failed there at its first archive with "unexpected keyword argument 'filter'")
define PYTHON_CHECK
import sys
if sys.version_info < (3, 11, 4):
    sys.exit(f"PYTHON={sys.executable} is Python {sys.version.split()[0]}: the book needs 3.11.4 or later "
             "(tarfile's extraction filters); run make with PYTHON=/path/to/python3.11")
endef
export PYTHON_CHECK

$(ENV_STAMP):
	@echo "creating the environment in $(VENV) (a few minutes, once)"
	@test -x $(PY) || { $(PYTHON) -c "$$PYTHON_CHECK" && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet -r requirements.txt 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install --quiet --no-deps -e . 2>&1 | $(QUIET_PIP)
	rm -f $(VENV)/.installed-* && touch $@

# headless Chromium renders the site in the tests (Debian's package)
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then echo "installing Debian's chromium for the rendering test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "the rendering test needs Chromium: sudo apt-get install chromium"; exit 1; fi; }

book: env
	$(VENV)/bin/replbook prepare
	$(VENV)/bin/replbook build

scoreboard: env
	$(VENV)/bin/replbook scoreboard

run: env
	$(VENV)/bin/replbook run $(PAPER) --preset $(PRESET) $(ARGS)

# nbval re-executes the committed notebooks; their results go to runs/, not results/.
# The cell timeout catches hangs, not slowness: chapter 01's unlearning cell takes ~11 min on
# a slow 2-core machine (an AMD EPYC of 2026-11, 2.2x slower than the one before it).
# The five chapters whose cold re-execution is longest (01, 02, 06, 07, 10) are re-executed by hand
# (make nbval-by-hand) and their record checked: a cold make test re-executing all eleven was
# on course for 94 min on a 2-core Intel Xeon, and with 02 it took 77 min on a 2-core AMD EPYC;
# 10 trains 15 encoders to a plateau (~25–38 min cold on Intel Xeons, 47–55 min on an AMD EPYC)
# (tests/test_regression.py, BY_HAND, says more).
BY_HAND_NOTEBOOKS := notebooks/01_restor.ipynb notebooks/02_skill_slices.ipynb notebooks/06_mllm_tracing.ipynb notebooks/07_drew.ipynb notebooks/10_semantic_tokens.ipynb
CI_NOTEBOOKS := $(filter-out $(BY_HAND_NOTEBOOKS),$(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb)))
NBVAL_CHECKS := --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg
NBVAL := $(NBVAL_CHECKS) --nbval-cell-timeout=1200

test: env browser
	$(VENV)/bin/replbook prepare
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 REPLBOOK_RESULTS_DIR=$(CURDIR)/runs/nbval-results $(PY) -m pytest tests \
	  $(CI_NOTEBOOKS) $(NBVAL) --durations=30

# by hand, like the stability records: re-executes 01, 02, 06, 07 and 10 under nbval and the
# regression guard (~75 min cold on a 2-core Intel Xeon, ~100 on a 2-core AMD EPYC, ~28 with warm caches) and records in results/guard/ that every cell and the
# guard passed
# Chapter 10's training cell (15 encoders) runs past the 20-minute cell timeout cold on a 2-core
# AMD EPYC (47–55 min, 2026-12-03), so 10 runs in a pytest of its own that gives its cells an hour.
LONG_CELL_NOTEBOOKS := notebooks/10_semantic_tokens.ipynb
BY_HAND_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 REPLBOOK_RESULTS_DIR=$(CURDIR)/runs/nbval-results REPLBOOK_RECORD_BY_HAND=1
nbval-by-hand: env
	$(VENV)/bin/replbook prepare 01 02 06 07 10
	$(BY_HAND_ENV) $(PY) -m pytest $(filter-out $(LONG_CELL_NOTEBOOKS),$(BY_HAND_NOTEBOOKS)) tests/test_regression.py \
	  -k "ipynb or (rerun_matches and not 10_semantic_tokens)" $(NBVAL)
	$(BY_HAND_ENV) $(PY) -m pytest $(LONG_CELL_NOTEBOOKS) tests/test_regression.py \
	  -k "ipynb or (rerun_matches and 10_semantic_tokens)" $(NBVAL_CHECKS) --nbval-cell-timeout=3600

# by hand: a change of shared code that moves no number (results.REFACTORS, e.g. how a cache entry
# is verified). Re-executes CHAPTERS (e.g. CHAPTERS="00 03") under nbval and the regression guard on
# this machine and records, per chapter, that every cell and number held, so that its code version
# stays the one its records were made under; a by-hand chapter's rerun record is written at the
# same time. WHY="..." says what changed.
REFACTOR_K = $(shell echo "$(CHAPTERS)" | sed -E 's/([0-9][0-9])/\1_/g; s/ +/ or /g')
refactor-proof: env
	test -n "$(CHAPTERS)" && test -n "$(WHY)"
	$(VENV)/bin/replbook prepare $(CHAPTERS)
	$(PY) -c "import sys; from replbook import paths, results; results.begin_refactor([paths.notebook_for(c, \
	  paths.repo_root()).stem for c in sys.argv[2:]], sys.argv[1])" "$(WHY)" $(CHAPTERS)
	$(BY_HAND_ENV) REPLBOOK_RECORD_REFACTOR=1 REPLBOOK_REFACTOR_WHY="$(WHY)" $(PY) -m pytest \
	  $(foreach c,$(CHAPTERS),$(wildcard notebooks/$(c)_*.ipynb)) tests/test_regression.py \
	  -k "ipynb or (rerun_matches and ($(REFACTOR_K)))" $(NBVAL_CHECKS) --nbval-cell-timeout=3600

# by hand, like the stability records: re-executes 00, 03, 09 and 10 with one injected bug each
# (~20 min on 2 cores) and records in results/guard/ that the regression guard failed on each
guard-proofs: env
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 REPLBOOK_RECORD_GUARD_PROOFS=1 $(PY) -m pytest tests/test_regression.py -k injected_bug

# by hand, like the guard proofs: each plausible wrong implementation in tests/mutants/catalogue.json
# applied to the library alone, its tests run, results/guard/mutants.json records which test failed;
# only mutants whose library file, tests or mutation changed rerun (ARGS=--all: every one, ~150 min on 2 cores)
mutants: env
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) tests/mutants/run.py $(ARGS)

clean:
	rm -rf _build runs book/_generated
