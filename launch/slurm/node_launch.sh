#!/usr/bin/env bash
# One node's part of a Slurm job: `accelerate launch` for this node's training processes.
#
# launch/slurm/job.sh runs it with srun, one task per node; its arguments go to the trainer
# ([--config FILE] [key=value ...]). This is the one place the `accelerate launch` command line
# is built. It reads the job's allocation from the variables srun sets:
#   SLURM_JOB_NUM_NODES  -> --num_machines
#   SLURM_NODEID         -> --machine_rank (node 0 hosts the rendezvous and global rank 0)
#   SLURM_JOB_NODELIST   -> --main_process_ip: the first host of `scontrol show hostnames`, at the
#                           address Slurm itself reaches that node by (its NodeAddr). Where scontrol
#                           cannot answer (no Slurm: DRY_RUN on a laptop), the first host is read off
#                           the list itself (gpu[001-008] -> gpu001) and used by name.
#   SLURM_JOB_ID         -> --main_process_port: 20000 + job id % 10000 unless MAIN_PROCESS_PORT is
#                           set, so two jobs sharing a node do not collide
#   SLURM_GPUS_ON_NODE   -> processes per node, unless PROCS_PER_NODE is set; --num_processes is
#                           the total over all nodes
# and from the settings job.sh documents: ACCELERATE_CONFIG (required), PROCS_PER_NODE,
# MAIN_PROCESS_PORT, TRAIN_SCRIPT (default trainer/train.py).
# DRY_RUN=1 prints the command instead of running it (one line, shell-quoted).
set -euo pipefail

: "${ACCELERATE_CONFIG:?set ACCELERATE_CONFIG to a file in launch/accelerate/}"
procs_per_node=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
if [[ -z $procs_per_node || $procs_per_node == 0 ]]; then
    echo "error: no GPUs allocated on $(hostname -s): request them with sbatch --gpus-per-node=N," \
        "or set PROCS_PER_NODE=N to run N processes per node (on the CPU where there is no GPU)" >&2
    exit 2
fi
num_machines=$SLURM_JOB_NUM_NODES

: "${SLURM_JOB_NODELIST:?set SLURM_JOB_NODELIST (srun sets it), e.g. gpu[001-008]}"
first_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1 || true)
if [[ -n $first_host ]]; then
    # A node name need not resolve as a host name (it does not on the tests' one-machine cluster);
    # NodeAddr is the address slurmctld reaches the node at, and defaults to the node name.
    main_ip=$(scontrol -o show node "$first_host" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' || true)
else
    # No Slurm here (no scontrol, or no cluster to ask): Slurm's host list syntax, first host only,
    # prefix[001-008,010]suffix,other -> prefix001suffix.
    first_host=${SLURM_JOB_NODELIST%%,*}
    if [[ $SLURM_JOB_NODELIST == *\[* && ${SLURM_JOB_NODELIST%%\[*} != *,* ]]; then
        ranges=${SLURM_JOB_NODELIST#*\[}
        rest=${ranges#*\]}
        first_host=${SLURM_JOB_NODELIST%%\[*}${ranges%%[-,\]]*}${rest%%,*}
    fi
    main_ip=""
fi
main_ip=${main_ip:-$first_host}

cmd=(
    accelerate launch
    --config_file "$ACCELERATE_CONFIG"
    --num_machines "$num_machines"
    --machine_rank "$SLURM_NODEID"
    --main_process_ip "$main_ip"
    --main_process_port "${MAIN_PROCESS_PORT:-$((20000 + SLURM_JOB_ID % 10000))}"
    --num_processes "$((procs_per_node * num_machines))"
    "${TRAIN_SCRIPT:-trainer/train.py}"
    "$@"
)
if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "${cmd[@]}" | sed 's/ $//'
    echo
    exit 0
fi
echo "[$(date +%T)] node ${SLURMD_NODENAME:-$(hostname -s)} (machine_rank $SLURM_NODEID): ${cmd[*]}"
exec "${cmd[@]}"
