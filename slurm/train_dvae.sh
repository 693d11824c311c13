#!/bin/bash
# Stage 1: the discrete VAE, data parallel over every GPU of the job (paper: 64 V100s).
#
#   sbatch slurm/train_dvae.sh
#   CONFIG=tiny DS_CONFIG=ds_configs/dvae.json RUN_DIR=runs/dvae-tiny \
#     sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 slurm/train_dvae.sh
#
# Environment (all optional): CONFIG, DS_CONFIG, RUN_DIR, IMAGE_SHARDS, EXTRA_ARGS.
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
set -euo pipefail
source "${DALLE_DS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/lib.sh"

CONFIG=${CONFIG:-paper}
DS_CONFIG=${DS_CONFIG:-ds_configs/dvae.json}
RUN_DIR=${RUN_DIR:-runs/dvae}
args=(run.dir="$RUN_DIR")
[ -n "${IMAGE_SHARDS:-}" ] && args+=(data.image_shards="$IMAGE_SHARDS")

run_distributed "$RUN_DIR" dalle_ds/train_dvae.py --deepspeed_config "$DS_CONFIG" --config "$CONFIG" "${args[@]}"
