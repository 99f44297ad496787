# shellcheck shell=bash
# The body of single_node.sbatch and multi_node.sbatch, which source it after their #SBATCH
# headers: one srun task per node runs launch/slurm/node_launch.sh (`accelerate launch`), and
# Slurm's warning signal becomes a checkpoint and a requeue.
#
# Arguments go to the trainer: [--config FILE] [key=value ...], as for trainer/train.py.
# Settings (environment variables; sbatch passes the submitting shell's environment to the job):
#   ACCELERATE_CONFIG  accelerate config file (each sbatch script sets its default)
#   PROCS_PER_NODE     training processes per node; default: the GPUs Slurm allocated on the node.
#                      With no GPU the processes run on the CPU (gloo): how the tests run this.
#   MAIN_PROCESS_PORT  rendezvous port on the first node (default 20000 + job id % 10000)
#   WARNING_SIGNAL     the signal of `#SBATCH --signal=B:<signal>@<seconds>` (default USR1):
#                      change both together
#   TRAIN_SCRIPT       what accelerate launches (default trainer/train.py). A testing hook: the
#                      tests point it at tests/dist/train_and_dump.py to compare the ranks' weights.
#
# Preemption and time limits. The header asks Slurm for WARNING_SIGNAL some seconds before the
# time limit, for this shell only (`B:`): `accelerate launch` (torchrun) would die of SIGUSR1
# rather than forward it to the trainer. The trap below creates <run.dir>/STOP instead; the
# trainer's ranks see it within 10 steps, write a complete checkpoint and exit 0; then this
# script requeues the job (`#SBATCH --requeue`), and the requeued job, same job id, resumes from
# that checkpoint (run.resume=auto). SIGTERM (time limit without warning, preemption, scancel)
# reaches the trainer directly and also ends in a checkpoint, but is not followed by a requeue
# here: after scancel the job must stay cancelled, and Slurm requeues preempted jobs itself.

: "${SLURM_JOB_ID:?submit the script with sbatch}"
repo=$SLURM_SUBMIT_DIR # sbatch runs a copy of the script: the repository is where it was submitted from
export ACCELERATE_CONFIG TRAIN_SCRIPT=${TRAIN_SCRIPT:-$repo/trainer/train.py}
warning_signal=${WARNING_SIGNAL:-USR1}
warning_signal=${warning_signal#SIG}

log() { echo "[$(date +%T)] job.sh: $*"; }

stop_signal=""
run_dir=""
keeper_pid=""
# shellcheck disable=SC2329  # called by the traps below
request_stop() {
    stop_signal=$1
    log "got SIG$1: asking the trainer to checkpoint and stop (${run_dir:-<run.dir>}/STOP)"
    keep_stop_file
}
# Keeps <run.dir>/STOP in place until the trainer exits: the trainer deletes a STOP it finds at
# start-up (meant for an earlier job), and a signal can arrive during start-up.
keep_stop_file() {
    if [[ -n $run_dir && -n $stop_signal && -z $keeper_pid ]]; then
        while :; do touch "$run_dir/STOP"; sleep 2; done &
        keeper_pid=$!
    fi
}
# Before anything slow: an untrapped SIGUSR1 would kill this shell.
# shellcheck disable=SC2064  # expand the signal name now
if ! trap "request_stop $warning_signal" "$warning_signal" 2>/dev/null; then
    echo "error: WARNING_SIGNAL=$warning_signal is not a signal name; use the one in #SBATCH --signal=B:<signal>@<seconds>, e.g. USR1" >&2
    exit 2
fi
trap 'request_stop TERM' TERM

log "job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST} (${SLURM_JOB_NUM_NODES} node(s)); trainer arguments: $*"

# run.dir as the trainer resolves it (config file, overrides, interpolation); a config error
# stops here, before any node starts.
run_dir=$(PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" python3 -c '
import sys
from trainer.core.config import parse_args
from trainer.util.errors import UserError
try:
    print(parse_args(sys.argv[1:]).run.dir)
except UserError as exc:
    sys.exit(f"error: {exc}")
' "$@") || exit 2
mkdir -p "$run_dir"
keep_stop_file
log "run directory $run_dir"
# A requeued job continues its own run, from the newest checkpoint it wrote, whatever run.resume
# its first start had: `never` would now refuse, and an explicit checkpoint would be older.
if ((${SLURM_RESTART_COUNT:-0} > 0)) && compgen -G "$run_dir/checkpoints/step-*" >/dev/null; then
    set -- "$@" run.resume=auto
    log "requeued: resuming from the newest checkpoint in $run_dir/checkpoints (run.resume=auto)"
fi

# The run's one-time work (download, pack, scan for bad files, reference statistics), once, here:
# inside the job it would keep the other ranks waiting in a collective (trainer/prepare.py). With
# data.cache_per_node=true each node's first process then prepares its own node-local cache.
log "preparing: python -m trainer.prepare $*"
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" python3 -m trainer.prepare "$@" || exit $?

# srun starts one task per node; srun does not take --cpus-per-task from sbatch (Slurm >= 22.05).
srun --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
    bash "$repo/launch/slurm/node_launch.sh" "$@" &
step_pid=$!
# bash runs a trap only between commands: wait on the background srun, which a trapped signal
# interrupts (srun keeps running; wait again).
while :; do
    wait "$step_pid"
    status=$?
    kill -0 "$step_pid" 2>/dev/null || break
done
if [[ -n $keeper_pid ]]; then kill "$keeper_pid" && wait "$keeper_pid"; fi 2>/dev/null
rm -f "$run_dir/STOP"

if [[ $stop_signal == "$warning_signal" && $status == 0 ]]; then
    # An array task by <array job>_<task>: its own job id may be the array's, which names every task.
    this_job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
    log "the trainer stopped cleanly; requeueing job ${this_job:-$SLURM_JOB_ID}, which resumes from the newest checkpoint"
    scontrol requeue "${this_job:-$SLURM_JOB_ID}"
fi
log "training exited with status $status"
exit "$status"
