# Set-up and entry points. `make demo` and `make test` create .venv if missing and install first: the demo only
# what it runs, the tests also the dev tools and the extras they check (llama.cpp, polygraphy).
VENV    ?= .venv
PY      := $(VENV)/bin/python
BIN     := $(VENV)/bin
PIP     := $(PY) -m pip install -q --disable-pip-version-check
STAMP   := $(VENV)/.installed
TSTAMP  := $(VENV)/.installed-test
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install install-test demo test readme-check lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || { echo "== creating $(VENV)"; python3 -m venv $(VENV); }
	@echo "== installing torch 2.13.0 (CPU build, from local disk; about 1 minute the first time)"
	$(PIP) torch==2.13.0
	@echo "== installing compress and its pinned stack (about 1 minute the first time)"
	$(PIP) -e .
	@touch $(STAMP)

$(TSTAMP): $(STAMP)
	@echo "== installing the test extras: pytest, ruff, polygraphy, onnxruntime-genai, and llama-cpp-python, which builds llama.cpp"
	@echo "   from source the first time (about 5 minutes on 2 cores; cached by pip afterwards)"
	$(PIP) -e ".[dev,trt-tools,llamacpp,genai]"
	@touch $(TSTAMP)

install: $(STAMP)

install-test: $(TSTAMP)

demo: install
	@echo "== pulling SmolLM2-135M into the cache (first time: download and GGUF conversion, about 30 s)"
	$(BIN)/compress models pull smollm2-135m
	@echo "== quantizing it layer by layer to 4.5 bits per weight (about 50 s on 2 cores)"
	$(BIN)/compress quantize smollm2-135m --layerwise --avg-bits 4.5 --candidates 6,5,4,3 --measure fast --tokens 512 \
		--eval-tokens 1024 --seq-len 256 --out out/smollm2-layerwise-4.5

test: install-test
	$(BIN)/ruff check .
	$(PY) -m pytest -q -rs; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here"; exit 1; fi; exit $$rc

readme-check: install
	$(PY) benchmarks/readme_check.py

bench: install
	$(PY) benchmarks/foundation.py

clean:
	rm -rf $(VENV) out .pytest_cache
