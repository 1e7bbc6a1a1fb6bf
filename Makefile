# Set-up and entry points. `make demo` and `make test` create .venv if missing and install first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,llamacpp]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/compress models pull smollm2-135m
	$(BIN)/compress quantize smollm2-135m --layerwise --avg-bits 4.5 --candidates 6,5,4,3 --measure fast --tokens 512 \
		--eval-tokens 1024 --seq-len 256 --out out/smollm2-layerwise-4.5

test: install
	$(BIN)/ruff check .
	$(PY) -m pytest -q -rs; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here"; exit 1; fi; exit $$rc

bench: install
	$(PY) benchmarks/foundation.py

clean:
	rm -rf $(VENV) out .pytest_cache
