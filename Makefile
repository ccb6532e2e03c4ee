# moe-suite: `make train` sets up and trains the default V-MoE; `make test` sets up and runs the tests.
PYTHON_SYS ?= $(shell command -v python3.11 || command -v python3)
VENV       ?= .venv
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
STAMP      := $(VENV)/.installed
DATA_DIR   ?= data

.PHONY: setup data train test test-all bench study clean

setup: $(STAMP) data

$(STAMP): pyproject.toml requirements/base.txt requirements/nodeps.txt Makefile
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements/base.txt
	# CPU build of fbgemm first, then torchrec without its CUDA dependency (docs/install.md).
	$(PIP) install -q fbgemm-gpu-cpu==1.9.0
	$(PIP) install -q --no-deps -r requirements/nodeps.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist package where apt is available (root or sudo);
# elsewhere vision.data looks in DATA_DIR and downloads when online.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ] || dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
	  :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
	    || echo "note: could not install dataset-fashion-mnist; vision.data will look in $(DATA_DIR)/ or download"; \
	fi

train: setup
	$(PY) -m vision.train

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

bench: setup
	$(PY) -m core.bench

# The router study in every domain, then the cross-domain table docs/router_study.md: what runs, with
# which settings and why, is scripts/router_study.sh (the sweep itself is conf/shared/router_study.yaml,
# each domain's budget conf/<domain>/experiment/router_study*.yaml). About 90 minutes on 2 CPU cores.
study: setup
	. $(VENV)/bin/activate && scripts/router_study.sh

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
