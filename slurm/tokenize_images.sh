#!/bin/bash
# Data: pre-encode image shards into dVAE token shards, a job array over shard ranges.
# Array element i of N takes the i-th contiguous range of the sorted shard list; its tasks (one
# per GPU; CPU cores when there is none) take every ntasks-th shard of that range. Finished
# shards are skipped, so a requeued, preempted or resubmitted element redoes only the shards it
# had not finished. The element that finishes last writes OUTPUT/manifest.json; element 0 checks
# VERIFY random samples (PSNR of the decoded tokens against the source images).
#
#   DVAE=runs/dvae/export INPUT=s3://data/shards/ OUTPUT=s3://data/tokens/ sbatch slurm/tokenize_images.sh
#   DVAE=... INPUT=... OUTPUT=... sbatch --array=0-3 --ntasks-per-node=2 --gpus-per-node=0 slurm/tokenize_images.sh
#   # rebuild the manifest by hand if needed:  python data_prep/tokenize_images.py ... --finalize
#
# Environment: DVAE, INPUT, OUTPUT (required: the dVAE export folder, the image shards, the token
# folder; local or s3://), BATCH_SIZE (default 128), VERIFY (default 16), EXTRA_ARGS, plus those in
# slurm/lib.sh (PYTHON, CONTAINER, DALLE_MODULES, ...). GPUs: to bind one GPU per task, replace
# --gpus-per-node=8 below by --gpus-per-task=1 (see slurm/lib.sh).
# Defaults: 16 elements x one 8xV100 node; each element requeues itself 5 minutes before its
# time limit (--signal) up to MAX_REQUEUES times.
#SBATCH --job-name=dalle-tokenize
#SBATCH --array=0-15
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
# Site settings: remove one '#' to use (or sbatch -p PARTITION -A ACCOUNT).
##SBATCH --partition=gpu
##SBATCH --account=myproject
set -euo pipefail
source "${DALLE_DS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/lib.sh"
require DVAE "the dVAE export folder (model.safetensors + config.json), local or s3://"
require INPUT "the image shards (folder, brace range, glob or s3:// prefix)"
require OUTPUT "the token shard folder or s3:// prefix"

requeue() {
  if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
    log "time limit near and MAX_REQUEUES=$MAX_REQUEUES reached: not requeueing"
    return
  fi
  log "time limit near: requeueing array element ${SLURM_ARRAY_TASK_ID:-} (finished shards are kept)"
  scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR1

log "array element ${SLURM_ARRAY_TASK_ID:-0} of ${SLURM_ARRAY_TASK_COUNT:-1}: $SLURM_NTASKS tasks, $INPUT -> $OUTPUT"
# shellcheck disable=SC2086
srun --kill-on-bad-exit=1 --label --cpu-bind=none "${RUN_PREFIX[@]}" "$PYTHON" data_prep/tokenize_images.py --dvae "$DVAE" \
  --input "$INPUT" --output "$OUTPUT" --batch-size "${BATCH_SIZE:-128}" --verify "${VERIFY:-16}" \
  --workers "${SLURM_CPUS_PER_TASK:-1}" $EXTRA_ARGS &
srun_pid=$!
rc=0
while true; do  # a USR1 trap interrupts `wait`; keep waiting for srun itself
  wait "$srun_pid" && rc=0 || rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
if [ "$rc" -ne 0 ]; then
  log "FAILED: srun exited with $rc (see the rank-prefixed lines above)"
  exit "$rc"
fi
log "done: element ${SLURM_ARRAY_TASK_ID:-0}'s shards are in $OUTPUT"
