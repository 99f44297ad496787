"""Smoke tests of the throwaway Slurm cluster itself (tests/slurm_cluster.py)."""

import re
import time

import pytest

pytestmark = pytest.mark.slurm


def _script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text("#!/bin/bash\n" + body.lstrip())
    path.chmod(0o755)
    return path


def test_single_node_job(slurm_cluster, tmp_path):
    script = _script(
        tmp_path,
        "one.sh",
        """
echo "node=$SLURMD_NODENAME nnodes=$SLURM_JOB_NUM_NODES args=$* extra=$EXTRA_VAR"
""",
    )
    job = slurm_cluster.submit(script, args=["a", "b"], env={"EXTRA_VAR": "42"})
    assert slurm_cluster.wait(job, timeout=30) == "COMPLETED", slurm_cluster.job_report(job)
    out = slurm_cluster.read_stdout(job)
    assert re.search(r"node=node[12] nnodes=1 args=a b extra=42", out), out


def test_two_node_job(slurm_cluster, tmp_path):
    script = _script(
        tmp_path,
        "two.sh",
        """
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
echo "batch on $SLURMD_NODENAME nodelist=$SLURM_JOB_NODELIST"
srun bash -c 'echo "task node=$SLURMD_NODENAME nodeid=$SLURM_NODEID procid=$SLURM_PROCID"'
""",
    )
    job = slurm_cluster.submit(script)
    assert slurm_cluster.wait(job, timeout=30) == "COMPLETED", slurm_cluster.job_report(job)
    out = slurm_cluster.read_stdout(job)
    tasks = set(re.findall(r"task node=(\S+) nodeid=(\d) procid=(\d)", out))
    assert {(n, i) for n, i, _ in tasks} == {("node1", "0"), ("node2", "1")}, out
    assert slurm_cluster.job_info(job)["NodeList"] == "node[1-2]"


@pytest.mark.slow  # waits for a requeue
def test_requeue_running_job(slurm_cluster, tmp_path):
    """`scontrol requeue` kills a running job and restarts it under the same id."""
    script = _script(
        tmp_path,
        "requeue.sh",
        """
echo "start restart=${SLURM_RESTART_COUNT:-none} job=$SLURM_JOB_ID"
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then echo finished; exit 0; fi
sleep 300
""",
    )
    job = slurm_cluster.submit(script, sbatch_args=["--requeue", "--open-mode=append"])
    slurm_cluster.wait_state(job, {"RUNNING"}, timeout=30)
    deadline = time.monotonic() + 30
    while "start restart=none" not in slurm_cluster.read_stdout(job):
        assert time.monotonic() < deadline, slurm_cluster.job_report(job)
        time.sleep(0.1)
    t0 = time.monotonic()
    slurm_cluster.requeue(job)
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED", slurm_cluster.job_report(job)
    print(f"requeue -> completed in {time.monotonic() - t0:.1f}s")
    info = slurm_cluster.job_info(job)
    assert info["Restarts"] == "1"
    out = slurm_cluster.read_stdout(job)
    assert f"start restart=none job={job}" in out and f"start restart=1 job={job}" in out, out
    assert "finished" in out, out


@pytest.mark.slow  # waits for a time limit's warning and a requeue
def test_signal_before_time_limit_then_self_requeue(slurm_cluster, tmp_path):
    """--signal=B:USR1@25 with --time=1 reaches a bash trap before the time limit.

    slurmctld checks time limits and warning signals in a sweep every 30 s and
    sends the signal at the first sweep where time left <= sig_time + 30 s, so
    with --time=1 @25 it arrives 5..35 s after the start (@30 or more could
    arrive at once, before the trap is installed).  The handler requeues its
    own job (what a trainer does after checkpointing); the second run sees
    SLURM_RESTART_COUNT=1 and finishes.
    """
    script = _script(
        tmp_path,
        "signal.sh",
        """
#SBATCH --time=1
#SBATCH --signal=B:USR1@25
#SBATCH --requeue
#SBATCH --open-mode=append
start=$(date +%s)
echo "start restart=${SLURM_RESTART_COUNT:-none}"
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then echo finished; exit 0; fi
on_usr1() {
    echo "got USR1 after $(( $(date +%s) - start ))s"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
trap on_usr1 USR1
# bash runs a trap only between commands: wait on a background child, never a foreground one.
sleep 300 &
wait $!
echo "no signal"
""",
    )
    t0 = time.monotonic()
    job = slurm_cluster.submit(script)
    assert slurm_cluster.wait(job, timeout=150) == "COMPLETED", slurm_cluster.job_report(job)
    print(f"signal + requeue + rerun in {time.monotonic() - t0:.1f}s")
    out = slurm_cluster.read_stdout(job)
    m = re.search(r"got USR1 after (\d+)s", out)
    assert m, out
    assert int(m.group(1)) < 60, out
    assert "start restart=1" in out and "finished" in out, out
    assert "no signal" not in out, out
    info = slurm_cluster.job_info(job)
    assert info["Restarts"] == "1", info
