#!/bin/bash
# Stage 1: the discrete VAE, data parallel over every GPU of the job (paper: 64 V100s).
#
#   IMAGE_SHARDS=s3://data/shards/ sbatch slurm/train_dvae.sh
#   CONFIG=tiny DS_CONFIG=ds_configs/dvae.json RUN_DIR=runs/dvae-tiny IMAGE_SHARDS=... \
#     sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 slurm/train_dvae.sh
#
# Environment: IMAGE_SHARDS (required: the image shards from slurm/shard_corpus.sh, local or s3://),
# EVAL_SHARDS (held-out shards evaluated at every image step), CONFIG (default paper), DS_CONFIG,
# RUN_DIR, EXTRA_ARGS, plus those in slurm/lib.sh (PYTHON, CONTAINER, DALLE_MODULES, ...).
# Global batch = dvae_train.micro_batch_size x ranks (paper: 8 x 64 = 512; no gradient accumulation):
# on fewer GPUs raise dvae_train.micro_batch_size in EXTRA_ARGS to keep it.
# GPUs: to bind one GPU per task, replace --gpus-per-node=8 below by --gpus-per-task=1 (see slurm/lib.sh).
#SBATCH --job-name=dalle-dvae
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# Site settings: remove one '#' to use (or sbatch -p PARTITION -A ACCOUNT).
##SBATCH --partition=gpu
##SBATCH --account=myproject
set -euo pipefail
source "${DALLE_DS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/lib.sh"
require IMAGE_SHARDS "the image shards (folder, brace range, glob or s3:// prefix) from slurm/shard_corpus.sh"

CONFIG=${CONFIG:-paper}
DS_CONFIG=${DS_CONFIG:-ds_configs/dvae.json}
RUN_DIR=${RUN_DIR:-runs/dvae}
opts=()
[ -n "${EVAL_SHARDS:-}" ] && opts+=(--eval_shards "$EVAL_SHARDS")
args=(run.dir="$RUN_DIR" data.image_shards="$IMAGE_SHARDS")

run_distributed "$RUN_DIR" dalle_ds/train_dvae.py --deepspeed_config "$DS_CONFIG" --config "$CONFIG" \
  "${opts[@]}" "${args[@]}"
