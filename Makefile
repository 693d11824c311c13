# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
export DS_ACCELERATOR ?= cpu
export PYTHONPATH := $(CURDIR)

.PHONY: venv demo test bench clean-demo

venv: $(VENV)/.installed

# torch first (the local CPU build here; a CUDA build already in the venv is kept), then the pins.
$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt \
		-r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps DALL-E==0.1
	touch $@

# The whole pipeline on the embedded shapes corpus, on CPU (tiny preset).
demo: venv
	$(PY) data_prep/make_shapes_corpus.py --output $(DEMO_DIR)/corpus --count 4000 --size 64 --seed 0
	$(PY) data_prep/make_shapes_corpus.py --output $(DEMO_DIR)/heldout_corpus --count 500 --size 64 --seed 1
	$(PY) data_prep/shard_corpus.py --input $(DEMO_DIR)/corpus --output $(DEMO_DIR)/shards \
		--samples-per-shard 500 --image-size 64 --workers 2
	$(PY) data_prep/shard_corpus.py --input $(DEMO_DIR)/heldout_corpus --output $(DEMO_DIR)/heldout_shards \
		--samples-per-shard 500 --image-size 64 --workers 2
	$(PY) data_prep/train_text_tokenizer.py --shards $(DEMO_DIR)/shards --vocab-size 512 \
		--output $(DEMO_DIR)/tokenizer.json
	@echo "demo outputs are in $(DEMO_DIR)"

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) -m bench.matmul_peak

clean-demo:
	rm -rf $(DEMO_DIR)
