"""launch/slurm/ on the throwaway two-node cluster (tests/slurm_cluster.py).

One node with two processes; a warning signal mid-run (checkpoint, requeue, resume: bit-identical
to the uninterrupted run); scancel (checkpoint, no requeue); two nodes of one process each; the
generated `accelerate launch` lines for 2 and 8 nodes; a config error.

The jobs run on the CPU: no GPU is allocated (--gpus-per-node=0 overrides the header) and
PROCS_PER_NODE sets the processes per node, which then use gloo. Each job is submitted from the
repository root (as the README says) with --chdir to a scratch directory, so the header's
--output=logs/slurm/%x-%j.out lands there.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, read_metrics, smoke_args
from tests.wandb_offline import offline_run_files, read_offline_run

pytestmark = pytest.mark.slurm

SINGLE_NODE = REPO / "launch" / "slurm" / "single_node.sbatch"
MULTI_NODE = REPO / "launch" / "slurm" / "multi_node.sbatch"
NODE_LAUNCH = REPO / "launch" / "slurm" / "node_launch.sh"
# Overrides of the scripts' GPU-cluster headers for the test cluster (nodes of 2 CPUs, no GPUs).
CPU_SBATCH = ["--gpus-per-node=0", "--cpus-per-task=2", "--time=10"]
# The smoke config made longer: 128 steps (two epochs of 64), a checkpoint every 8, so that a
# warning signal sent after the first checkpoint arrives mid-run.
LONG = ["data.fake_size=1024", "train.epochs=2", "ckpt.every_steps=8", "ckpt.keep=100", "log.every_steps=8"]


def _job_env(**settings: str) -> dict[str, str]:
    """What the submitting shell would export: the tests' CPU settings and the scripts' settings."""
    return {
        # The scripts call `python3` and `accelerate`: this interpreter's, as in an activated venv.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "CUDA_VISIBLE_DEVICES": "",
        **settings,
    }


def _submit(cluster, script: Path, work: Path, args: list[str], **settings: str) -> str:
    (work / "logs" / "slurm").mkdir(parents=True, exist_ok=True)
    return cluster.submit(
        script,
        args=args,
        env=_job_env(**settings),
        sbatch_args=[f"--chdir={work}", *CPU_SBATCH],
        cwd=REPO,
        script_output=True,
    )


def _log(work: Path, job: str) -> str:
    return (work / "logs" / "slurm" / f"dcgan-{job}.out").read_text()


def _same(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _wait_for_checkpoint(cluster, job: str, checkpoint: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not checkpoint.is_dir():
        assert cluster.state(job) in ("PENDING", "RUNNING"), cluster.job_report(job)
        assert time.monotonic() < deadline, cluster.job_report(job)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def single_node_run(slurm_cluster, tmp_path_factory):
    """The (longer) smoke config through single_node.sbatch, two processes on one node, uninterrupted:
    also the reference the interrupted and the two-node runs must match bit for bit."""
    work = tmp_path_factory.mktemp("single")
    run_dir = work / "run"
    job = _submit(slurm_cluster, SINGLE_NODE, work, smoke_args(run_dir, *LONG), PROCS_PER_NODE="2")
    assert slurm_cluster.wait(job, timeout=180) == "COMPLETED", slurm_cluster.job_report(job)
    return job, work, run_dir


@pytest.mark.slow  # trains the smoke config on the cluster
def test_single_node_script_trains_the_smoke_config_with_two_processes(slurm_cluster, single_node_run):
    job, work, run_dir = single_node_run
    assert slurm_cluster.stdout_path(job) == work / "logs" / "slurm" / f"dcgan-{job}.out"
    log = _log(work, job)
    assert "--num_machines 1 --machine_rank 0" in log and "--num_processes 2" in log, log
    assert "(8 per process x 2)" in log, log
    assert "job.sh: preparing: python -m trainer.prepare" in log and "prepared in" in log, log  # before srun
    assert log.index("prepared in") < log.index("--num_machines 1"), log
    assert "finished at step 128/128" in log, log
    assert "training exited with status 0" in log and "requeueing" not in log, log
    assert slurm_cluster.job_info(job)["Restarts"] == "0"

    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [f"step-{s:08d}" for s in range(8, 129, 8)], checkpoints
    assert all((run_dir / "checkpoints" / name / "manifest.json").is_file() for name in checkpoints)
    samples = {p.name for p in (run_dir / "samples").iterdir()}
    assert {"real.png", "step_00000010.png", "step_00000120.png", "epoch_001.png", "epoch_002.png"} <= samples
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(8, 129, 8))
    assert (run_dir / "generator.safetensors").is_file() and (run_dir / "discriminator.safetensors").is_file()


@pytest.mark.slow  # trains the smoke config on the cluster
def test_warning_signal_checkpoints_requeues_and_resumes_to_the_same_weights(slurm_cluster, single_node_run, tmp_path):
    _, _, reference = single_node_run
    work = tmp_path / "work"
    run_dir = work / "run"
    # run.resume=never guards the first start only: the requeued job must resume all the same.
    args = smoke_args(run_dir, *LONG, "run.resume=never")
    job = _submit(slurm_cluster, SINGLE_NODE, work, args, PROCS_PER_NODE="2")
    _wait_for_checkpoint(slurm_cluster, job, run_dir / "checkpoints" / "step-00000008")
    # What `#SBATCH --signal=B:USR1@300` does before the time limit, without waiting for it
    # (tests/slurm/test_cluster.py shows that header signal reaching a batch script's trap).
    slurm_cluster.cancel(job, signal_name="USR1", batch_only=True)
    assert slurm_cluster.wait(job, timeout=180) == "COMPLETED", slurm_cluster.job_report(job)

    log = _log(work, job)
    assert slurm_cluster.job_info(job)["Restarts"] == "1", log
    assert "got SIGUSR1" in log and f"requeueing job {job}" in log, log
    stopped = re.search(r"stopped at step (\d+)/128", log)
    assert stopped, log
    step = int(stopped.group(1))
    assert 8 < step < 128 and step % 10 == 0, log  # mid-run, where the ranks agreed to stop
    assert f"job {job} restart 1 on" in log and "requeued: resuming from the newest checkpoint" in log, log
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{step:08d}'} (step {step}," in log, log
    assert "finished at step 128/128" in log, log
    assert (run_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()
    assert not (run_dir / "STOP").exists()

    # No step lost or trained twice: the reference's log steps plus the stop's own (its last window
    # is logged), once each, in order; images seen follow the steps; bit-identical final weights.
    expected = sorted({m["step"] for m in read_metrics(reference)} | {step})
    assert [m["step"] for m in read_metrics(run_dir)] == expected
    assert [m["images_seen"] for m in read_metrics(run_dir)] == [s * 16 for s in expected]
    for name in ("generator.safetensors", "discriminator.safetensors"):
        assert _same(reference / name, run_dir / name), name
    # One W&B run (offline here) across both starts: its first start's name (run.name and the job) and
    # group (run.name); the requeue (same job id, the next restart) is listed beside the first start.
    files = offline_run_files(run_dir)
    runs = [read_offline_run(path) for path in files]
    assert len(runs) == 2 and len({r.run_id for r in runs}) == 1, [p.parent.name for p in files]
    assert {(r.name, r.group) for r in runs} == {(f"smoke-{job}", "smoke")}
    assert [(j["job_id"], j["restart_count"]) for j in runs[1].config["slurm"]["jobs"]] == [(job, 0), (job, 1)]


@pytest.mark.slow  # trains the smoke config on the cluster
def test_scancel_checkpoints_and_does_not_requeue(slurm_cluster, tmp_path):
    """SIGTERM (scancel; the time limit and preemption send the same) reaches every process of the
    job: the trainer checkpoints within Slurm's KillWait (5 s here), and the job stays cancelled.
    With W&B (offline) on: the same SIGTERM kills W&B's service process, and the trainer must go on
    without its tracker to write the stop checkpoint."""
    work = tmp_path / "work"
    run_dir = work / "run"
    job = _submit(slurm_cluster, SINGLE_NODE, work, smoke_args(run_dir, *LONG), PROCS_PER_NODE="2")
    _wait_for_checkpoint(slurm_cluster, job, run_dir / "checkpoints" / "step-00000008")
    slurm_cluster.cancel(job)
    assert slurm_cluster.wait(job, timeout=60) == "CANCELLED", slurm_cluster.job_report(job)
    log = _log(work, job)
    stopped = re.search(r"stopped at step (\d+)/128 \(SIGTERM\)", log)
    assert stopped, log
    step = int(stopped.group(1))
    assert (run_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file(), log
    assert "got SIGTERM" in log and "requeueing" not in log, log
    assert slurm_cluster.job_info(job)["Restarts"] == "0"


@pytest.mark.slow  # trains the smoke config on the cluster
def test_multi_node_script_trains_on_two_nodes_to_identical_weights(slurm_cluster, single_node_run, tmp_path):
    work = tmp_path / "work"
    run_dir = work / "run"
    job = _submit(
        slurm_cluster,
        MULTI_NODE,
        work,
        smoke_args(run_dir, *LONG),
        PROCS_PER_NODE="1",
        TRAIN_SCRIPT=str(REPO / "tests" / "dist" / "train_and_dump.py"),
    )
    assert slurm_cluster.wait(job, timeout=180) == "COMPLETED", slurm_cluster.job_report(job)
    log = _log(work, job)
    assert slurm_cluster.job_info(job)["NodeList"] == "node[1-2]"
    for node, rank in (("node1", 0), ("node2", 1)):
        assert re.search(
            rf"node {node} \(machine_rank {rank}\): accelerate launch .* --num_machines 2 --machine_rank {rank} "
            r"--main_process_ip 127\.0\.0\.1 --main_process_port \d+ --num_processes 2 ",
            log,
        ), log
    assert "(8 per process x 2)" in log, log  # one process on each node: a world of two
    assert "finished at step 128/128" in log, log

    for model in (0, 1):  # G, D
        a = load_file(str(run_dir / f"rank0_{model}.safetensors"))
        b = load_file(str(run_dir / f"rank1_{model}.safetensors"))
        # BatchNorm running statistics stay per rank (no SyncBatchNorm on CPU; see tests/test_training.py).
        params = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert params and all(torch.equal(a[k], b[k]) for k in params), f"model {model} differs across nodes"
    # Two nodes of one process train exactly as one node of two.
    _, _, single_dir = single_node_run
    for name in ("generator.safetensors", "discriminator.safetensors"):
        assert _same(single_dir / name, run_dir / name), name


def _dry_run(cluster, nodes: int, node_id: int, **settings: str) -> subprocess.CompletedProcess:
    env = {
        **cluster.env,  # SLURM_CONF: scontrol expands the host list
        "DRY_RUN": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": f"gpu[001-{nodes:03d}]",
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NODEID": str(node_id),
        "SLURM_GPUS_ON_NODE": "8",
        "ACCELERATE_CONFIG": "launch/accelerate/multi_node.yaml",
        **settings,
    }
    args = ["--config", "configs/dcgan_cifar10.yaml", "train.epochs=5"]
    return subprocess.run(["bash", str(NODE_LAUNCH), *args], cwd=REPO, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("nodes", [2, 8])
def test_generated_accelerate_launch_command_lines(slurm_cluster, nodes):
    lines = []
    for node_id in range(nodes):
        proc = _dry_run(slurm_cluster, nodes, node_id)
        assert proc.returncode == 0, proc.stderr
        lines.append(proc.stdout.strip())
        assert shlex.split(proc.stdout) == [
            "accelerate",
            "launch",
            "--config_file",
            "launch/accelerate/multi_node.yaml",
            "--num_machines",
            str(nodes),
            "--machine_rank",
            str(node_id),
            # gpu001 is no node of the test cluster: no NodeAddr, so its host name
            "--main_process_ip",
            "gpu001",
            "--main_process_port",
            "24242",
            "--num_processes",
            str(8 * nodes),
            "trainer/train.py",
            "--config",
            "configs/dcgan_cifar10.yaml",
            "train.epochs=5",
        ]
    print(f"\n{nodes} nodes x 8 GPUs:\n" + "\n".join(lines))


def test_node_launch_without_gpus_or_procs_per_node_says_what_to_set(slurm_cluster):
    proc = _dry_run(slurm_cluster, 2, 0, SLURM_GPUS_ON_NODE="")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "--gpus-per-node=N" in proc.stderr and "PROCS_PER_NODE" in proc.stderr


def test_config_error_fails_the_job_before_any_node_starts(slurm_cluster, tmp_path):
    job = _submit(slurm_cluster, SINGLE_NODE, tmp_path, ["--config", "configs/nope.yaml"], PROCS_PER_NODE="2")
    assert slurm_cluster.wait(job, timeout=60) == "FAILED", slurm_cluster.job_report(job)
    assert slurm_cluster.job_info(job)["ExitCode"] == "2:0"
    log = _log(tmp_path, job)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "configs/nope.yaml" in errors[0], log
    assert "accelerate launch" not in log and not list(tmp_path.glob("runs")), log
