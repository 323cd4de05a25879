# Quickstart: `make demo` (set up + harvest, train and evaluate TopK SAEs on the bundled tiny model), `make test` (set up + tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.saelab-installed

.PHONY: setup demo test test-tl3 bench bench-venv clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e '.[app,dev]'
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/saelab demo $(if $(CI),--no-app,)

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -x --timeout=900 --durations=30 tests

# TransformerLens 3.9 (what SAELens pins) in its own environment: model loading, harvest and SAELens-interop tests
test-tl3:
	test -x .venv-tl3/bin/python || $(PY) -m venv .venv-tl3
	.venv-tl3/bin/pip install -q $(TORCH)
	.venv-tl3/bin/python -c "import torch; print('torch==' + torch.__version__)" > .venv-tl3/constraints.txt
	.venv-tl3/bin/pip install -q -c .venv-tl3/constraints.txt 'transformer-lens>=3.9,<4' sae-lens pytest pytest-timeout
	.venv-tl3/bin/pip install -q -c .venv-tl3/constraints.txt --no-deps -e .
	.venv-tl3/bin/pip install -q -c .venv-tl3/constraints.txt h5py datasets safetensors tqdm einops jsonschema scipy
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv-tl3/bin/python -m pytest -q -m tl3 --timeout=900 --durations=15 tests

bench: setup bench-venv
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_harvest.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_train.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_archs.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_encode.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_analyze.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_load.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_logit_effects.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_dense_chunks.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_attribute.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_clt.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_suites.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_vs_saelens.py --saelens-python .venv-bench/bin/python
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_mfr.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_gba.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_e2e.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_jumprelu.py

# SAELens (pins transformer-lens < 4) in its own environment for the side-by-side benchmark
bench-venv: .venv-bench/.installed
.venv-bench/.installed:
	test -x .venv-bench/bin/python || $(PY) -m venv .venv-bench
	.venv-bench/bin/pip install -q $(TORCH)
	.venv-bench/bin/python -c "import torch; print('torch==' + torch.__version__)" > .venv-bench/constraints.txt
	.venv-bench/bin/pip install -q -c .venv-bench/constraints.txt sae-lens h5py jsonschema
	touch $@

# the documentation site (mkdocs-material) into site/; the [docs] extra is installed on first use
.PHONY: docs
docs: setup
	$(BIN)/python -c "import mkdocs, material, mkdocstrings_handlers.python, mkdocs_jupyter" 2>/dev/null \
		|| $(BIN)/pip install -q -c $(VENV)/constraints.txt -e '.[docs]'
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) .venv-tl3 .venv-bench activations/demo runs/demo

# the import contracts (pyproject.toml [tool.importlinter]) on the installed layout: there the app in app/ is
# saelab.app, as a regular install has it
.PHONY: lint
lint: setup
	rm -rf build && $(BIN)/pip install -q --no-deps --target build/lint .
	cd build/lint && PYTHONPATH=. $(CURDIR)/$(BIN)/lint-imports $(CURDIR)/pyproject.toml
