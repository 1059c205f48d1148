# One venv at the repository root. torch is installed first and pinned: unpinned, deepspeed
# would pull a multi-GB CUDA build. The stamp makes a second `make setup` a no-op unless
# requirements.txt or pyproject.toml changed.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup test lint demo clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.13.0"
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	# Test-only: OpenCLIP's own tokenizer for the parity test. Without its dependencies
	# (torchvision's PyPI wheel does not import beside the CPU torch); never used by the product.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps "open_clip_torch==3.3.0"
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/python -m pytest -q

# Train (2 CPU processes) → evaluate → export to demo/export → HF pipeline check → plots.
# Everything is written under demo/; see trainer/demo.py.
demo: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 \
		$(BIN)/python -m trainer.demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Only the cluster and launcher tests (also part of `make test`); they start their own local
# Slurm, installing slurm-wlm + munge with apt-get when missing (root).
.PHONY: test-slurm
test-slurm: setup
	$(BIN)/python -m pytest -q tests/slurm tests/e2e/test_launchers.py
