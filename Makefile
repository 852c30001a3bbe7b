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
# The quickstart's baseline ships with the repository (trained on the default corpus, which every machine
# synthesizes bit-identically: tests/test_synth.py checks it by digest); `make baseline` retrains it.
SHIPPED := baselines/quickstart
BASELINE ?= runs/baseline/model.safetensors
# The ECAPA-TDNN quickstart's baseline, shipped the same way (same corpus); `make baseline-ecapa` retrains it.
SHIPPED_ECAPA := baselines/quickstart_ecapa
BASELINE_ECAPA ?= runs/baseline_ecapa/model.safetensors
PYTEST_ARGS ?=
# Every version `make install` resolves is pinned here (torch aside: the CPU wheel or the GPU machine's own build);
# `make lock` re-resolves it on purpose, in a throwaway venv, after which the whole suite must pass again.
LOCK := constraints.txt
# WeSpeaker's own model files, for the tests that compare our networks with them (--no-deps: its package
# pulls heavy optional dependencies that the model files do not need).
WESPEAKER := wespeaker-unofficial==0.0.2

.PHONY: install lock test test-fast demo demo-fresh demo-ecapa baseline baseline-ecapa lint bench clean

install: $(STAMP) $(INFER_WHEELS)

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c $(LOCK) -e ".[dev]"
	$(BIN)/pip install -q --no-deps "$(WESPEAKER)"
	touch $(STAMP)

lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q "$(TORCH_SPEC)"
	.lock-venv/bin/pip install -q -e ".[dev]"
	{ echo "# make lock: the versions make install uses (torch is installed on its own first)."; \
	  .lock-venv/bin/pip freeze --exclude-editable | grep -iv '^torch=='; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .lock-venv

# Wheels of the four packages an exported infer.py needs: the test that runs infer.py in a fresh venv
# installs them from here, offline (tests run inside loopback-only). Needs the network, like install.
$(INFER_WHEELS): $(STAMP) lsv_core/export/inference.py
	$(BIN)/pip download -q -c $(LOCK) -d $(VENV)/wheels-infer $$($(BIN)/python -c \
		"from lsv_core.export.inference import INFER_REQUIREMENTS as r; print(' '.join(r))")
	touch $(INFER_WHEELS)

test: $(STAMP) $(INFER_WHEELS)
	$(LOOPBACK) $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(LOOPBACK) $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The quickstart study: the corpus is made first when missing (cached afterwards) and checked against the
# one the shipped baseline was trained on, then the study and its static report
# (runs/quickstart/report/index.html); re-running resumes the study (it is complete after the first run),
# `make demo-fresh` starts it over.
demo: $(STAMP)
	@[ -f $(CORPUS)/corpus.json ] || $(BIN)/lsv corpus synth --out $(CORPUS)
	$(BIN)/python -c "from lsv_core.data.synth import check_corpus; check_corpus('$(CORPUS)', '$(SHIPPED)/corpus.json')"
	$(LOOPBACK) $(BIN)/lsv run studies/quickstart.toml
	$(BIN)/lsv report studies/quickstart.toml
	$(BIN)/lsv status studies/quickstart.toml

demo-fresh: $(STAMP)
	$(LOOPBACK) $(BIN)/lsv run studies/quickstart.toml --fresh
	$(BIN)/lsv report studies/quickstart.toml

# The same for the ECAPA-TDNN quickstart (studies/quickstart_ecapa.toml, runs/quickstart_ecapa/).
demo-ecapa: $(STAMP)
	@[ -f $(CORPUS)/corpus.json ] || $(BIN)/lsv corpus synth --out $(CORPUS)
	$(BIN)/python -c "from lsv_core.data.synth import check_corpus; check_corpus('$(CORPUS)', '$(SHIPPED_ECAPA)/corpus.json')"
	$(LOOPBACK) $(BIN)/lsv run studies/quickstart_ecapa.toml
	$(BIN)/lsv report studies/quickstart_ecapa.toml
	$(BIN)/lsv status studies/quickstart_ecapa.toml

# Retrain the shipped baseline from the corpus ($(SHIPPED)/train_config.json) into $(BASELINE); point a
# study's model.checkpoint at it to use it.
baseline: $(STAMP)
	@[ -f $(CORPUS)/corpus.json ] || $(BIN)/lsv corpus synth --out $(CORPUS)
	$(BIN)/lsv train --corpus $(CORPUS) --config $(SHIPPED)/train_config.json --out $(BASELINE) --cache runs/cache

baseline-ecapa: $(STAMP)
	@[ -f $(CORPUS)/corpus.json ] || $(BIN)/lsv corpus synth --out $(CORPUS)
	$(BIN)/lsv train --corpus $(CORPUS) --config $(SHIPPED_ECAPA)/train_config.json --out $(BASELINE_ECAPA) --cache runs/cache

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(LOOPBACK) $(BIN)/python bench/kmeans.py

clean:
	rm -rf runs data .pytest_cache
