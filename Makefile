# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
# Sampling of the demo's evaluation (chosen on the 64 dev captions, README "What each lever bought"); e.g.
# `make demo DEMO_SAMPLING="--temperature 0.7"`, or with a prior trained with data.caption_dropout:
# "--guidance-scale 3" (classifier-free guidance)
DEMO_SAMPLING ?= --temperature 1.0
# Prior updates of the demo: what fits the 20-minute budget on a 2-core CPU (README, "What `make demo`
# reports": 16 min 42 s with 900 updates, 20 min 14 s with 1200 on an idle Zen 3). The prior learns on
# well past it: `make demo DEMO_PRIOR_STEPS=4800` (about 29 more minutes at 0.46 s per update).
DEMO_PRIOR_STEPS ?= 1000
export DS_ACCELERATOR ?= cpu
export PYTHONPATH := $(CURDIR)

.PHONY: venv demo test test-gpu bench clean-demo

venv: $(VENV)/.installed

# torch first (the local CPU build here; a CUDA build already in the venv is kept), then the pins,
# then this checkout in editable mode (the dalle-* console scripts in $(VENV)/bin).
$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt \
		-r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps DALL-E==0.1
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# The whole pipeline on the embedded shapes corpus, on CPU (tiny preset).
demo: venv
	# Training scenes and held-out scenes: caption meanings are split by hash, so no held-out caption
	# (under any phrasing) occurs in training; evaluate_captions counts the overlap and refuses any.
	$(PY) data_prep/make_shapes_corpus.py --output $(DEMO_DIR)/corpus --count 4000 --size 64 --seed 0 \
		--split train --workers 2
	$(PY) data_prep/make_shapes_corpus.py --output $(DEMO_DIR)/heldout_corpus --count 1000 --size 64 --seed 1 \
		--split heldout --workers 2
	$(PY) data_prep/shard_corpus.py --input $(DEMO_DIR)/corpus --output $(DEMO_DIR)/shards \
		--samples-per-shard 500 --image-size 64 --workers 2
	$(PY) data_prep/shard_corpus.py --input $(DEMO_DIR)/heldout_corpus --output $(DEMO_DIR)/heldout_shards \
		--samples-per-shard 500 --image-size 64 --workers 2
	$(PY) data_prep/train_text_tokenizer.py --shards $(DEMO_DIR)/shards --vocab-size 512 \
		--output $(DEMO_DIR)/tokenizer.json
	# Stage 1: the dVAE on 2 ranks (held-out evaluation once, at the end), then its held-out PSNR / SSIM /
	# codebook usage and reconstruction grid
	OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus 2 dalle_ds/train_dvae.py --deepspeed_config ds_configs/dvae.json \
		--config tiny --eval-shards $(DEMO_DIR)/heldout_shards run.dir=$(DEMO_DIR)/dvae data.image_shards=$(DEMO_DIR)/shards \
		logging.image_every_steps=100000 checkpoint.every_steps=1200
	$(PY) -m dalle_ds.evaluate_dvae --checkpoint $(DEMO_DIR)/dvae/export --shards $(DEMO_DIR)/heldout_shards \
		--grid $(DEMO_DIR)/dvae_reconstructions.png
	# Pre-encoding: image shards -> token shards, with a decode check; the held-out scenes too (validation loss)
	$(PY) data_prep/tokenize_images.py --dvae $(DEMO_DIR)/dvae/export --input $(DEMO_DIR)/shards \
		--output $(DEMO_DIR)/tokens --batch-size 64 --verify 16 --no-progress
	$(PY) data_prep/tokenize_images.py --dvae $(DEMO_DIR)/dvae/export --input $(DEMO_DIR)/heldout_shards \
		--output $(DEMO_DIR)/heldout_tokens --batch-size 64 --no-progress
	# Stage 2: the prior under ZeRO-3 on 2 ranks (every parameter of the 1M-parameter model persists: no
	# per-forward gathers), validation loss on the held-out tokens, sample grids; exported for sampling
	OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus 2 dalle_ds/train.py --deepspeed_config ds_configs/zero3_fp32_cpu_small.json \
		--config tiny run.dir=$(DEMO_DIR)/prior optim.max_steps=$(DEMO_PRIOR_STEPS) data.token_shards=$(DEMO_DIR)/tokens \
		data.tokenizer=$(DEMO_DIR)/tokenizer.json data.dvae=$(DEMO_DIR)/dvae/export \
		data.validation_shards=$(DEMO_DIR)/heldout_tokens
	$(PY) -m dalle_ds.export $(DEMO_DIR)/prior $(DEMO_DIR)/prior/export
	# Reranker CLIP + judge CLIP (trained side by side), 16 samples for each of 128 held-out test captions,
	# caption-match rates with 95% intervals per caption kind and attribute, judge-CLIP FID/IS/CLIP score
	$(PY) -m dalle_ds.evaluate_captions --run $(DEMO_DIR) --checkpoint $(DEMO_DIR)/prior/export --dvae $(DEMO_DIR)/dvae/export \
		$(DEMO_SAMPLING)
	@echo "demo outputs are in $(DEMO_DIR)"

test: venv
	$(PY) -m pytest

# GPU tests (tests/test_gpu.py, marker gpu): NCCL on CUDA, world size 1 (2 ranks with >= 2 GPUs); on a
# machine without CUDA they skip with a reason. `make test` collects them too and they skip there.
test-gpu: venv
	DS_ACCELERATOR=cuda $(PY) -m pytest -m gpu -rs

bench: venv
	$(PY) -m bench.matmul_peak
	$(PY) -m bench.attention --threads 1
	$(PY) -m bench.train_prior --configs tiny B 100M --steps 3
	$(PY) -m bench.sampling --threads 1

clean-demo:
	rm -rf $(DEMO_DIR)
