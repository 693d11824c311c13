#!/bin/bash
# Data: shard a raw image-text corpus into webdataset shards, one worker per CPU; as a job array,
# one contiguous part of the inputs per array element (OUTPUT/part-NNNNN/), then one finalize job
# merges the parts' manifests and applies the filters that compare samples with earlier ones
# (duplicates; --phash-distance, --max-caption-repeats from the parts' EXTRA_ARGS) in input order,
# so the result holds the same samples as one job (tests/test_slurm_shard.py runs this on a real cluster).
# Resumable: a requeued or re-submitted job skips the shards already written.
#
#   INPUT=s3://raw/pairs.jsonl OUTPUT=s3://data/shards/ sbatch slurm/shard_corpus.sh          # one machine
#   jid=$(INPUT=s3://raw/ OUTPUT=s3://data/shards/ sbatch --parsable --array=0-15 slurm/shard_corpus.sh)
#   FINALIZE=1 NUM_PARTS=16 OUTPUT=s3://data/shards/ sbatch --dependency=afterok:$jid slurm/shard_corpus.sh
#
# Environment: INPUT (not with FINALIZE), OUTPUT (required), SAMPLES_PER_SHARD (default 10000),
# FINALIZE=1 + NUM_PARTS, EXTRA_ARGS, plus those in slurm/lib.sh (PYTHON, CONTAINER, DALLE_MODULES, ...).
#SBATCH --job-name=dalle-shard
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# Site settings: remove one '#' to use (or sbatch -p PARTITION -A ACCOUNT).
##SBATCH --partition=cpu
##SBATCH --account=myproject
set -euo pipefail
source "${DALLE_DS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/lib.sh"
require OUTPUT "the shard folder or s3:// prefix"
if [[ "${FINALIZE:-0}" == 1 ]]; then
  require NUM_PARTS "the number of array parts to merge"
  log "finalizing $NUM_PARTS part(s) of $OUTPUT"
  # shellcheck disable=SC2086
  srun --kill-on-bad-exit=1 "${RUN_PREFIX[@]}" "$PYTHON" data_prep/shard_corpus.py --output "$OUTPUT" \
    --num-parts "$NUM_PARTS" --finalize $EXTRA_ARGS
  exit 0
fi
require INPUT "the raw corpus (folder, TSV/JSONL table or tars; local or s3://)"
[[ -n "${SLURM_ARRAY_TASK_ID:-}" ]] && log "array element $SLURM_ARRAY_TASK_ID of ${SLURM_ARRAY_TASK_COUNT:-?}: its part of the inputs"

log "sharding $INPUT -> $OUTPUT with ${SLURM_CPUS_PER_TASK:-1} workers"
# shellcheck disable=SC2086
srun --kill-on-bad-exit=1 "${RUN_PREFIX[@]}" "$PYTHON" data_prep/shard_corpus.py --input "$INPUT" --output "$OUTPUT" \
  --samples-per-shard "${SAMPLES_PER_SHARD:-10000}" --workers "${SLURM_CPUS_PER_TASK:-1}" $EXTRA_ARGS
