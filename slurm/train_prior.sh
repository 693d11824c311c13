#!/bin/bash
# Stage 2: the transformer prior. One process per GPU; ZeRO-3 inside each node, PowerSGD across nodes.
#
#   sbatch slurm/train_prior.sh                      # paper preset, 128 nodes x 8 V100, fp16 block scaling
#   sbatch --nodes=16 slurm/train_prior.sh           # any #SBATCH line can be overridden on the command line
#   CONFIG=tiny DS_CONFIG=ds_configs/zero3_fp32_cpu.json RUN_DIR=runs/tiny-slurm \
#     sbatch --nodes=2 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 slurm/train_prior.sh
#
# Environment (all optional): CONFIG (preset name or YAML), DS_CONFIG, RUN_DIR, TOKEN_SHARDS,
# TOKENIZER, EXTRA_ARGS (dotted overrides), plus those in slurm/lib.sh.
#SBATCH --job-name=dalle-prior
#SBATCH --nodes=128
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
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_fp16_v100.json}
RUN_DIR=${RUN_DIR:-runs/prior}
args=(run.dir="$RUN_DIR" powersgd.node_size="${SLURM_NTASKS_PER_NODE%%(*}")
[ -n "${TOKEN_SHARDS:-}" ] && args+=(data.token_shards="$TOKEN_SHARDS")
[ -n "${TOKENIZER:-}" ] && args+=(data.tokenizer="$TOKENIZER")

run_distributed "$RUN_DIR" dalle_ds/train.py --deepspeed_config "$DS_CONFIG" --config "$CONFIG" "${args[@]}"
