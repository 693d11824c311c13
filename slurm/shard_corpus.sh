#!/bin/bash
# Data: shard a raw image-text corpus into webdataset shards, one node, one worker per CPU.
# Resumable: a requeued or re-submitted job skips the shards already written.
#
#   INPUT=s3://raw/pairs.jsonl OUTPUT=s3://data/shards/ sbatch slurm/shard_corpus.sh
#
# Environment: INPUT (required), OUTPUT (required), SAMPLES_PER_SHARD (default 10000), EXTRA_ARGS.
#SBATCH --job-name=dalle-shard
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
source "${DALLE_DS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/lib.sh"
: "${INPUT:?set INPUT to the raw corpus (folder, table or tars; local or s3://)}"
: "${OUTPUT:?set OUTPUT to the shard folder or s3:// prefix}"

log "sharding $INPUT -> $OUTPUT with ${SLURM_CPUS_PER_TASK:-1} workers"
# shellcheck disable=SC2086
srun --kill-on-bad-exit=1 "$PYTHON" data_prep/shard_corpus.py --input "$INPUT" --output "$OUTPUT" \
  --samples-per-shard "${SAMPLES_PER_SHARD:-10000}" --workers "${SLURM_CPUS_PER_TASK:-1}" $EXTRA_ARGS
