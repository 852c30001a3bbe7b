# lsv-quant. `make demo` and `make test` work on a fresh machine: they install into .venv first (the only
# step that needs the network), then run offline. Whatever starts Ray or a server runs through
# ../shared/loopback-only when it exists, so all traffic stays on 127.0.0.1.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
INFER_WHEELS := $(VENV)/wheels-infer/.fetched
LOOPBACK ?= $(shell [ -x ../shared/loopback-only ] && echo ../shared/loopback-only)
# CPU wheel on machines without an NVIDIA driver; GPU machines keep pip's default (CUDA) build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
CORPUS ?= data/corpus
BASELINE ?= runs/baseline/model.safetensors
PYTEST_ARGS ?=

.PHONY: install test test-fast demo demo-fresh lint bench clean

install: $(STAMP) $(INFER_WHEELS)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# Wheels of the four packages an exported infer.py needs: the test that runs infer.py in a fresh venv
# installs them from here, offline (tests run inside loopback-only). Needs the network, like install.
$(INFER_WHEELS): $(STAMP) lsv_core/export/inference.py
	$(BIN)/pip download -q -d $(VENV)/wheels-infer $$($(BIN)/python -c \
		"from lsv_core.export.inference import INFER_REQUIREMENTS as r; print(' '.join(r))")
	touch $(INFER_WHEELS)

test: $(STAMP) $(INFER_WHEELS)
	$(LOOPBACK) $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(LOOPBACK) $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The quickstart study: corpus and baseline are made first when missing (cached afterwards), then the
# study and its static report (runs/quickstart/report/index.html); re-running resumes the study (it is
# complete after the first run), `make demo-fresh` starts it over.
demo: $(STAMP)
	@[ -f $(CORPUS)/corpus.json ] || $(BIN)/lsv corpus synth --out $(CORPUS)
	@[ -f $(BASELINE) ] || $(BIN)/lsv train --corpus $(CORPUS) --out $(BASELINE) --cache runs/cache
	$(LOOPBACK) $(BIN)/lsv run studies/quickstart.toml
	$(BIN)/lsv report studies/quickstart.toml
	$(BIN)/lsv status studies/quickstart.toml

demo-fresh: $(STAMP)
	$(LOOPBACK) $(BIN)/lsv run studies/quickstart.toml --fresh
	$(BIN)/lsv report studies/quickstart.toml

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(LOOPBACK) $(BIN)/python bench/kmeans.py

clean:
	rm -rf runs data .pytest_cache
