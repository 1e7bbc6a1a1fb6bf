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
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/compress models pull smollm2-135m
	$(BIN)/compress score smollm2-135m --methods lim,zd,ablation --out out/scores-smollm2.json

test: install
	$(BIN)/ruff check .
	$(PY) -m pytest -q -rs; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here"; exit 1; fi; exit $$rc

bench: install
	$(PY) benchmarks/foundation.py

clean:
	rm -rf $(VENV) out .pytest_cache
