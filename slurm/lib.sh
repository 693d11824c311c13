# Shared by the sbatch scripts in slurm/. Sourced, not run.
#
# Every default can be overridden by the environment at submission (sbatch exports it):
#   DALLE_DS_ROOT  repository checkout on the shared file system (default: the submit directory)
#   PYTHON         interpreter (default: $DALLE_DS_ROOT/.venv/bin/python)
#   MAX_REQUEUES   how many times a preempted/timed-out job requeues itself (default 50)
#   EXTRA_ARGS     appended to the stage's command line (e.g. dotted config overrides)

DALLE_DS_ROOT=${DALLE_DS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${PYTHON:-$DALLE_DS_ROOT/.venv/bin/python}
MAX_REQUEUES=${MAX_REQUEUES:-50}
EXTRA_ARGS=${EXTRA_ARGS:-}
cd "$DALLE_DS_ROOT"
export PYTHONPATH="$DALLE_DS_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# torch.distributed rendezvous: the first node's address (NodeAddr, which also works for
# nodes whose names do not resolve) and a port derived from the job id. DeepSpeed reads no
# SLURM variables; dalle_ds.parallel.dist maps SLURM_PROCID/NTASKS/LOCALID to RANK/WORLD_SIZE/LOCAL_RANK.
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "$first_node" | grep -oP 'NodeAddr=\K\S+' || echo "$first_node")}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export DS_ACCELERATOR=${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null && echo cuda || echo cpu)}
if [ "$DS_ACCELERATOR" = cpu ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
fi

log() { echo "[$(date '+%F %T')] [job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}] $*"; }

# run_distributed RUN_DIR script.py args...
# One process per task (srun). A rank that fails kills the whole step at once (--kill-on-bad-exit)
# and the job ends FAILED with that rank's traceback in the log (lines are prefixed with the rank).
# A trainer that stopped early on SIGUSR1/SIGTERM (preemption, or --signal before the time limit)
# has checkpointed, written RUN_DIR/REQUEUE and exited 75 (srun then stops the other ranks, whose
# part of the checkpoint is already complete): the job requeues itself
# and the next run resumes from RUN_DIR's latest checkpoint without any flag.
run_distributed() {
  local run_dir=$1; shift
  log "nodes=$SLURM_JOB_NODELIST tasks=$SLURM_NTASKS master=$MASTER_ADDR:$MASTER_PORT run_dir=$run_dir"
  log "command: $PYTHON $* $EXTRA_ARGS"
  local rc=0
  # shellcheck disable=SC2086
  srun --kill-on-bad-exit=1 --label --cpu-bind=none "$PYTHON" "$@" $EXTRA_ARGS || rc=$?
  if [ -f "$run_dir/COMPLETED" ]; then
    log "finished at step $(cat "$run_dir/COMPLETED"): $run_dir/COMPLETED"
    return 0
  fi
  if [ -f "$run_dir/REQUEUE" ]; then  # signal -> every rank checkpointed -> exit 75
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
      log "stopped early and MAX_REQUEUES=$MAX_REQUEUES reached: not requeueing"
      exit 1
    fi
    log "checkpointed at step $(cat "$run_dir/REQUEUE") after a signal: requeueing"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  log "FAILED: srun exited with $rc (see the rank-prefixed lines above)"
  exit $(( rc == 0 ? 1 : rc ))
}
