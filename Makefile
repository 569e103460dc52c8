# mixlab: two commands. `make demo` sets everything up and runs the main notebook;
# `make test` sets everything up and runs the test suite. Both are idempotent.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mixlab-installed
SHARED_DATA ?= ../shared/data
export MIXLAB_DATA ?= $(CURDIR)/data
DATA_STAMP := $(MIXLAB_DATA)/.mixlab-prepared
# smoke on a CPU-only machine, short where CUDA is present; `make demo PROFILE=paper` overrides
PROFILE ?= $(shell $(PY) -c "import torch; print('short' if torch.cuda.is_available() else 'smoke')" 2>/dev/null || echo smoke)
DEMO_NOTEBOOK ?= amp_cifar10
PYTEST_ARGS ?=

.PHONY: demo test setup data browser notebooks evidence bench device-pack clean help

help:
	@echo "make demo   - set up .venv and data, run notebooks/$(DEMO_NOTEBOOK).ipynb (profile: smoke on CPU, short on CUDA); figures in runs/figures"
	@echo "make test   - set up .venv and data, run the test suite"
	@echo "make notebooks - run every notebook with papermill in PROFILE"
	@echo "make evidence - every notebook in the cpu profile, one at a time on every core: the committed figures/*_cpu.png"
	@echo "make bench  - python -m mixlab.bench (quick on CPU)"
	@echo "make device-pack - wheels and data for running on an offline GPU machine (docs/gpu_machine.md)"

setup: $(STAMP)

# One venv, installed once with every extra (all: notebooks, eval, tensorboard) and the test
# tools; pyproject.toml changes trigger a reinstall.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[all,test,browser]"
	$(PY) -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $(STAMP)

# Offline copies beside the checkout are unpacked once into $(MIXLAB_DATA) (never into
# ../shared). Without them, `python -m mixlab download cifar10` fetches the originals.
data: $(DATA_STAMP)
$(DATA_STAMP): | $(STAMP)
	mkdir -p $(MIXLAB_DATA)
	if [ -d $(SHARED_DATA) ]; then $(PY) -m mixlab prepare --from $(SHARED_DATA); \
	else echo "no offline data at $(SHARED_DATA): run '$(PY) -m mixlab download cifar10'"; fi
	touch $(DATA_STAMP)

# The demo writes only ignored files: the executed notebook, the runs (reused by a second
# demo, evaluations included) and its figures and tables (in runs/figures, not the committed
# figures/; DEMO_FIGURES=... to choose). CPU threads: MIXLAB_THREADS, 1 unless you set it.
DEMO_FIGURES ?= $(CURDIR)/runs/figures
demo: export MIXLAB_FIGURES = $(DEMO_FIGURES)
demo: export MIXLAB_THREADS ?= 1
demo: setup data
	mkdir -p runs "$(DEMO_FIGURES)"
	$(VENV)/bin/papermill notebooks/$(DEMO_NOTEBOOK).ipynb runs/$(DEMO_NOTEBOOK).ipynb \
	    -p profile $(PROFILE) --cwd notebooks
	@echo "executed notebook: runs/$(DEMO_NOTEBOOK).ipynb; figures and tables: $(DEMO_FIGURES)"

# The margin explorer's browser test drives Debian's Chromium with Playwright (no browser
# download): install it once where we may (root with apt-get); elsewhere the test is skipped
# and says why.
BROWSER_STAMP := $(VENV)/.mixlab-browser
browser: $(BROWSER_STAMP)
$(BROWSER_STAMP): | $(STAMP)
	if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null; \
	  else echo "no /usr/bin/chromium and not root: the browser test will be skipped"; fi; \
	fi
	touch $(BROWSER_STAMP)

test: setup data browser
	$(PY) -m pytest $(PYTEST_ARGS)

notebooks: setup data
	$(PY) -m mixlab.notebooks --profile $(PROFILE)

# The committed results: every notebook in the cpu profile, figures and tables into figures/
# (*_cpu.png with their JSON sidecars; each notebook's wall time in <job>_time_cpu.json). One
# notebook at a time on every core (MIXLAB_THREADS, two on a two-core machine), so each time is
# that notebook's alone; every notebook runs even when one fails its checks, and the exit
# status says whether any did. AMP's ablation runs its base variant; the margin explorer opens
# AMP's ERM and PGD-AT runs instead of training its own; MMA runs on MNIST, the dataset its cpu
# preset is sized for. Point EVIDENCE_RUNS at an empty folder to time first runs.
EVIDENCE_RUNS ?= $(CURDIR)/runs
AMP_CPU_RUNS := $(EVIDENCE_RUNS)/amp_cifar10/cpu/cifar10-eps8-seed0
evidence: export MIXLAB_RUNS = $(EVIDENCE_RUNS)
evidence: export MIXLAB_THREADS ?= $(shell nproc 2>/dev/null || echo 2)
evidence: setup data
	@status=0; \
	$(PY) -m mixlab.notebooks --profile cpu --only amp_cifar10 -p variants=base -p quiet=true \
	    || status=1; \
	$(PY) -m mixlab.notebooks --profile cpu --only margin_explorer -p quiet=true \
	    -p 'run_dirs={"erm": "$(AMP_CPU_RUNS)/erm", "pgd_at": "$(AMP_CPU_RUNS)/pgd_at"}' \
	    || status=1; \
	$(PY) -m mixlab.notebooks --profile cpu --only quickstart mixup_theory gairat_cifar10 \
	    mma_mnist baselines_cifar10 -p quiet=true || status=1; \
	exit $$status

bench: setup
	$(PY) -m mixlab.bench $(if $(filter smoke,$(PROFILE)),--quick,)

# wheels and data for an offline GPU machine, in the ignored .carry/ (docs/gpu_machine.md)
device-pack:
	python3 tools/device_kit.py pack --shared-data $(SHARED_DATA)
	python3 tools/device_kit.py plan

clean:
	rm -rf runs .pytest_cache
