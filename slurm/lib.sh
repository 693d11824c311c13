# Shared by the sbatch scripts in slurm/. Sourced, not run.
#
# Every default can be overridden by the environment at submission (sbatch exports it):
#   DALLE_DS_ROOT  repository checkout on the shared file system (default: the submit directory)
#   PYTHON         interpreter (default: $DALLE_DS_ROOT/.venv/bin/python if it exists, else python3;
#                  `python` inside CONTAINER)
#   CONTAINER      an Apptainer/Singularity image (docker/dalle-ds.def): every task runs
#                  `apptainer exec --nv $CONTAINER $PYTHON ...` (the checkout's code, the image's packages)
#   DALLE_MODULES  environment modules to load first, e.g. DALLE_MODULES="cuda/12.6 nccl" -> module load cuda/12.6 nccl
#   MAX_REQUEUES   how many times a preempted/timed-out job requeues itself (default 50)
#   EXTRA_ARGS     appended to the stage's command line (e.g. dotted config overrides)
#
# Site settings: uncomment `##SBATCH --partition` / `##SBATCH --account` in a script, or pass them at
# submission (`sbatch -p gpu -A myproj ...`, or SBATCH_PARTITION / SBATCH_ACCOUNT in the environment).
#
# GPUs: one process per GPU. `--gpus-per-node=8` (the default) shows each task all 8 GPUs and
# `--gpus-per-task=1` shows each task only its own; both work, because the code picks the device
# LOCAL_RANK % torch.cuda.device_count() (LOCAL_RANK from SLURM_LOCALID). Where the site confines each
# task to its GPU with cgroups, --gpus-per-task=1 can cost NCCL its intra-node peer-to-peer paths;
# prefer --gpus-per-node there when the site allows it.

log() { echo "[$(date '+%F %T')] [job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0}] $*"; }

# require VAR "what it is": a script's inputs are checked before anything starts;
# a missing one ends the job with exit status 2 and one line naming the variable.
require() {
  if [ -z "${!1:-}" ]; then
    echo "error: $1 is not set ($2)" >&2
    exit 2
  fi
}

DALLE_DS_ROOT=${DALLE_DS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$DALLE_DS_ROOT"
RUN_PREFIX=()
if [ -n "${CONTAINER:-}" ]; then
  RUN_PREFIX=(apptainer exec --nv "$CONTAINER")
  PYTHON=${PYTHON:-python}
elif [ -x "$DALLE_DS_ROOT/.venv/bin/python" ]; then
  PYTHON=${PYTHON:-$DALLE_DS_ROOT/.venv/bin/python}
else
  PYTHON=${PYTHON:-python3}
fi
MAX_REQUEUES=${MAX_REQUEUES:-50}
EXTRA_ARGS=${EXTRA_ARGS:-}
export PYTHONPATH="$DALLE_DS_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [ -n "${DALLE_MODULES:-}" ]; then
  set +u  # module init scripts read unset variables
  if ! command -v module >/dev/null 2>&1; then  # batch shells are not login shells
    for init in /etc/profile.d/lmod.sh /etc/profile.d/modules.sh /usr/share/lmod/lmod/init/bash; do
      if [ -f "$init" ]; then source "$init"; break; fi
    done
  fi
  if ! command -v module >/dev/null 2>&1; then
    echo "error: DALLE_MODULES is set ($DALLE_MODULES) but this node has no \`module\` command" >&2
    exit 2
  fi
  log "module load $DALLE_MODULES"
  # shellcheck disable=SC2086
  module load $DALLE_MODULES
  set -u
fi

# torch.distributed rendezvous: the first node's address (NodeAddr, which also works for
# nodes whose names do not resolve) and a port derived from the job id. DeepSpeed reads no
# SLURM variables; dalle_ds.parallel.dist maps SLURM_PROCID/NTASKS/LOCALID to RANK/WORLD_SIZE/LOCAL_RANK.
# Outside a job (a script run by hand) this is skipped so the input checks still speak first.
if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "$first_node" | grep -oP 'NodeAddr=\K\S+' || echo "$first_node")}
  export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
fi
export DS_ACCELERATOR=${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null && echo cuda || echo cpu)}
if [ "$DS_ACCELERATOR" = cpu ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
fi

# run_distributed RUN_DIR script.py args...
# One process per task (srun). A rank that fails kills the whole step at once (--kill-on-bad-exit)
# and the job ends FAILED with that rank's traceback in the log (lines are prefixed with the rank).
# A trainer that stopped early on SIGUSR1/SIGTERM (preemption, or --signal before the time limit)
# has checkpointed, written RUN_DIR/REQUEUE and exited 75 (srun then stops the other ranks, whose
# part of the checkpoint is already complete): the job requeues itself
# and the next run resumes from RUN_DIR's latest checkpoint without any flag.
run_distributed() {
  local run_dir=$1; shift
  require SLURM_JOB_ID "not inside a SLURM job: submit this script with sbatch"
  log "nodes=$SLURM_JOB_NODELIST tasks=$SLURM_NTASKS master=$MASTER_ADDR:$MASTER_PORT run_dir=$run_dir"
  log "command: ${RUN_PREFIX[*]:+${RUN_PREFIX[*]} }$PYTHON $* $EXTRA_ARGS"
  local rc=0
  # shellcheck disable=SC2086
  srun --kill-on-bad-exit=1 --label --cpu-bind=none "${RUN_PREFIX[@]}" "$PYTHON" "$@" $EXTRA_ARGS || rc=$?
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
