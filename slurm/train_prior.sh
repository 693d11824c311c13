#!/bin/bash
# Stage 2: the transformer prior. One process per GPU; ZeRO-3 inside each node, PowerSGD across nodes.
#
#   TOKEN_SHARDS=s3://data/tokens/ TOKENIZER=data/tokenizer.json sbatch slurm/train_prior.sh
#       # paper preset, 128 nodes x 8 V100, fp16 block scaling, global batch 1 x 1024 ranks = 1024
#   GLOBAL_BATCH_SIZE=1024 TOKEN_SHARDS=... TOKENIZER=... sbatch --nodes=16 slurm/train_prior.sh
#       # any #SBATCH line can be overridden on the command line; 128 ranks x grad_accum 8 keep 1024
#   CONFIG=tiny DS_CONFIG=ds_configs/zero3_fp32_cpu.json RUN_DIR=runs/tiny-slurm TOKEN_SHARDS=... TOKENIZER=... \
#     sbatch --nodes=2 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 slurm/train_prior.sh
#
# Environment: TOKEN_SHARDS, TOKENIZER (required: the token shards from slurm/tokenize_images.sh and the
# text tokenizer; local or s3://), CONFIG (preset name or YAML, default paper), DS_CONFIG, RUN_DIR,
# DVAE (the dVAE export the tokens were made with: training checks its hash), GLOBAL_BATCH_SIZE,
# EXTRA_ARGS (dotted overrides), plus those in slurm/lib.sh (PYTHON, CONTAINER, DALLE_MODULES, ...).
#
# Global batch = optim.micro_batch_size x optim.grad_accum_steps x ranks. GLOBAL_BATCH_SIZE sets
# optim.global_batch_size: train.py then derives optim.grad_accum_steps from the ranks at hand, so the
# same preset on fewer nodes keeps its batch; a size that micro batch x ranks do not divide is refused
# (exit 2) before srun. The script logs the global batch either way.
#
# GPUs: one task per GPU. To bind one GPU per task instead of showing each task the node's 8, replace
# --gpus-per-node=8 below by --gpus-per-task=1 (see slurm/lib.sh).
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
# Site settings: remove one '#' to use (or sbatch -p PARTITION -A ACCOUNT).
##SBATCH --partition=gpu
##SBATCH --account=myproject
set -euo pipefail
source "${DALLE_DS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/lib.sh"
require TOKEN_SHARDS "the token shards (folder, brace range, glob or s3:// prefix) from slurm/tokenize_images.sh"
require TOKENIZER "the text tokenizer JSON from data_prep/train_text_tokenizer.py"
require SLURM_JOB_ID "not inside a SLURM job: submit this script with sbatch"

CONFIG=${CONFIG:-paper}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_fp16_v100_16bit.json}  # 16-bit regime for V100-16GB; zero3_fp16_v100.json: fp32 masters
RUN_DIR=${RUN_DIR:-runs/prior}
args=(run.dir="$RUN_DIR" powersgd.node_size="${SLURM_NTASKS_PER_NODE%%(*}"
      data.token_shards="$TOKEN_SHARDS" data.tokenizer="$TOKENIZER")
[ -n "${DVAE:-}" ] && args+=(data.dvae="$DVAE")

[ -n "${GLOBAL_BATCH_SIZE:-}" ] && args+=(optim.global_batch_size="$GLOBAL_BATCH_SIZE")

# The batch the config and the overrides give on these ranks: train.py derives optim.grad_accum_steps
# from optim.global_batch_size the same way (OptimConfig.for_world); a config error or a global batch
# that micro batch x ranks do not divide stops the job here, before srun, with one line and exit 2.
ranks=$SLURM_NTASKS
# shellcheck disable=SC2086
sizes=$("${RUN_PREFIX[@]}" "$PYTHON" -c '
import sys
from dalle_ds.config import ConfigError, load_config
try:
    cfg = load_config(sys.argv[2], [a for a in sys.argv[3:] if "=" in a and not a.startswith("-")])
    optim = cfg.optim.for_world(int(sys.argv[1]))
except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
print(optim.micro_batch_size, optim.grad_accum_steps)' "$ranks" "$CONFIG" "${args[@]}" $EXTRA_ARGS)
read -r micro accum <<<"$sizes"
log "global batch $((micro * accum * ranks)) = micro batch $micro x grad_accum $accum x $ranks ranks${GLOBAL_BATCH_SIZE:+ (GLOBAL_BATCH_SIZE)}"

run_distributed "$RUN_DIR" dalle_ds/train.py --deepspeed_config "$DS_CONFIG" --config "$CONFIG" "${args[@]}"
