"""launch/slurm/sweep_array.sbatch on the throwaway two-node cluster: a sweep as a job array.

W&B form: each task runs `wandb agent --count 1 <sweep>`. There is no W&B server here: `wandb` on
the job's PATH is tests/sweep_agent_standin.py, which starts each trial with W&B's own agent code
(the command line and environment `wandb agent` gives a trial) and applies the server's rules
(trials proposed by W&B's sweeps engine, a preempted run handed back to the next agent). Lines
form: task i trains line i of a file of overrides, through job.sh.

In both, each task trains its trial with two CPU processes (gloo), and one task gets Slurm's
warning signal mid-run: it must checkpoint, requeue, and the requeued task must resume the same
trial in the same run directory (and, W&B form, the same W&B run) to the end.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SMOKE, TINY_NETS, read_metrics
from tests.slurm.test_launch_scripts import CPU_SBATCH, _job_env
from tests.sweep_agent_standin import server_runs, sweep_environment
from tests.wandb_offline import offline_run_files, read_offline_run
from trainer.monitor.wandb_sink import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slurm

SWEEP_ARRAY = REPO / "launch" / "slurm" / "sweep_array.sbatch"
LR_BETA1 = REPO / "configs" / "sweeps" / "lr_beta1.yaml"
# 32 steps an epoch, 2 epochs, a checkpoint every 8 steps, an evaluation at the end (stand-in extractor).
SMALL = [
    *TINY_NETS,
    "data.fake_size=512",
    "train.batch_size=16",
    "train.epochs=2",
    "train.mixed_precision=no",
    "ckpt.every_steps=8",
    "ckpt.keep=100",
    "log.every_steps=8",
    "log.sample_every_steps=32",
    "log.sample_grid_size=16",
    "eval.every_epochs=2",
    "eval.feature_extractor=tests.standin_extractor:StandInExtractor",
    "eval.num_samples=32",
    "eval.batch_size=32",
    "eval.kid_subsets=4",
    "eval.kid_subset_size=16",
]
STEPS = list(range(8, 65, 8))
# The machine's Accelerate default (what `accelerate config` writes): two processes. The W&B form's
# trials start with a plain `accelerate launch`, which uses it.
TWO_PROCESSES = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 2
gpu_ids: all
mixed_precision: 'no'
use_cpu: false
"""


def _submit(cluster, work: Path, args: list[str], array: str, env: dict[str, str]) -> str:
    (work / "logs" / "slurm").mkdir(parents=True, exist_ok=True)
    (work / "tmp").mkdir(exist_ok=True)
    return cluster.submit(
        SWEEP_ARRAY,
        args=args,
        env=_job_env(TMPDIR=str(work / "tmp"), **env),
        sbatch_args=[f"--chdir={work}", f"--array={array}", *CPU_SBATCH],
        cwd=REPO,
        script_output=True,
    )


def _log(work: Path, array_job: str, task: int) -> str:
    path = work / "logs" / "slurm" / f"dcgan-sweep-{array_job}_{task}.out"
    return path.read_text() if path.exists() else ""


def _wait_for(condition, cluster, job: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert cluster.state(job) in ("PENDING", "RUNNING"), cluster.job_report(job)
        assert time.monotonic() < deadline, cluster.job_report(job)
        time.sleep(0.1)


def _trained_to_the_end_once(run_dir: Path, stopped_at: int | None = None) -> None:
    """Every log step once, in order (plus the stop's own), and the evaluation at the end."""
    rows = read_metrics(run_dir)
    expected = sorted(set(STEPS) | ({stopped_at} if stopped_at else set()))
    assert [m["step"] for m in rows if "loss_D" in m] == expected, run_dir
    assert [m["step"] for m in rows if "fid" in m] == [64], run_dir
    assert (run_dir / "checkpoints" / "step-00000064" / "manifest.json").is_file()


def test_wandb_agent_array_one_trial_per_task_and_a_requeued_trial_resumes(slurm_cluster, tmp_path):
    work, runs = tmp_path / "work", tmp_path / "runs"
    (work / "hf" / "accelerate").mkdir(parents=True)
    (work / "hf" / "accelerate" / "default_config.yaml").write_text(TWO_PROCESSES)
    env = sweep_environment(work / "agent", LR_BETA1, runs)
    env["PATH"] = env["PATH"].split(":", 1)[0] + ":" + _job_env()["PATH"]  # the stand-in, then the test's python
    env.update(
        HF_HOME=str(work / "hf"),
        DCGAN_OVERRIDES=" ".join([*SMALL, f"run.dir={runs}", f"eval.cache_dir={work / 'stats'}"]),
    )
    array = _submit(slurm_cluster, work, ["me/dcgan-trainer/swp9"], "0-1", env)
    task0 = f"{array}_0"

    # Task 0's trial: the run the agent started (its log names it), once it has a checkpoint.
    _wait_for(lambda: "wandb agent (stand-in): run " in _log(work, array, 0), slurm_cluster, task0)
    trial = re.search(r"wandb agent \(stand-in\): run (\w+) of sweep", _log(work, array, 0)).group(1)
    _wait_for(lambda: (runs / trial / "checkpoints" / "step-00000008").is_dir(), slurm_cluster, task0)
    # What `#SBATCH --signal=B:USR1@300` does before the time limit (tests/slurm/test_cluster.py).
    slurm_cluster.cancel(task0, signal_name="USR1", batch_only=True)
    for task in (0, 1):
        job = f"{array}_{task}"
        assert slurm_cluster.wait(job, timeout=400) == "COMPLETED", slurm_cluster.job_report(job)

    log0, log1 = _log(work, array, 0), _log(work, array, 1)
    assert slurm_cluster.job_info(task0)["Restarts"] == "1" and slurm_cluster.job_info(f"{array}_1")["Restarts"] == "0"
    assert "got SIGUSR1: asking the trial to checkpoint and stop" in log0 and f"requeueing task {task0}:" in log0, log0
    stopped = int(re.search(r"stopped at step (\d+)/64 \(\S+ exists\); W&B requeues this trial", log0).group(1))
    assert 8 < stopped < 64, log0
    # The requeued task's agent got the same trial back, which resumed in its own directory.
    assert re.findall(r"wandb agent \(stand-in\): run (\w+) of sweep", log0) == [trial, trial], log0
    assert f"resumed from {runs / trial / 'checkpoints' / f'step-{stopped:08d}'}" in log0, log0
    assert log0.count("finished at step 64/64") == 1 and "(8 per process x 2)" in log0, log0
    assert "finished at step 64/64" in log1 and "(8 per process x 2)" in log1, log1

    trials = {run["id"]: run for run in server_runs(work / "agent")}
    assert len(trials) == 2 and {run["state"] for run in trials.values()} == {"finished"}, trials
    assert sorted(p.name for p in runs.iterdir()) == sorted(trials)
    _trained_to_the_end_once(runs / trial, stopped)
    (other,) = set(trials) - {trial}
    _trained_to_the_end_once(runs / other)
    for run_id, run in trials.items():
        cfg = yaml.safe_load((runs / run_id / "config.yaml").read_text())
        assert cfg["train"]["lr"] == pytest.approx(run["params"]["train.lr"])

    # W&B: one run per trial, the agent's run id, in the sweep; the interrupted one across both starts.
    starts = [read_offline_run(f) for f in offline_run_files(runs / trial)]
    assert [r.run_id for r in starts] == [trial, trial] and {r.sweep_id for r in starts} == {"swp9"}
    assert (starts[0].preempting, starts[0].exit_code, starts[1].exit_code) == (True, REQUEUE_EXIT_CODE, 0)
    assert all(r.name.startswith(f"sweep_lr_beta1/{trial} ") for r in starts)
    assert starts[1].history[0]["_step"] > starts[0].history[-1]["_step"]  # the resumed run goes on


def test_lines_array_one_line_per_task_and_a_requeued_line_resumes(slurm_cluster, tmp_path):
    work, runs = tmp_path / "work", tmp_path / "runs"
    trials = tmp_path / "grid.txt"
    trials.write_text("# lr x beta1\ntrain.lr=0.0001\n\ntrain.lr=0.0003 train.betas.0=0.3\n")
    args = [
        "--lines",
        str(trials),
        "--config",
        str(SMOKE),
        *SMALL,
        f"run.dir={runs}",
        f"eval.cache_dir={work / 'stats'}",
    ]
    array = _submit(slurm_cluster, work, args, "0-1", {"PROCS_PER_NODE": "2"})
    task1 = f"{array}_1"
    _wait_for(lambda: (runs / "grid-1" / "checkpoints" / "step-00000008").is_dir(), slurm_cluster, task1)
    slurm_cluster.cancel(task1, signal_name="USR1", batch_only=True)
    for task in (0, 1):
        job = f"{array}_{task}"
        assert slurm_cluster.wait(job, timeout=400) == "COMPLETED", slurm_cluster.job_report(job)

    log0, log1 = _log(work, array, 0), _log(work, array, 1)
    assert "line 0 of" in log0 and "--num_processes 2" in log0 and "finished at step 64/64" in log0, log0
    assert slurm_cluster.job_info(task1)["Restarts"] == "1", log1
    assert "got SIGUSR1" in log1 and f"requeueing job {task1}, which resumes" in log1, log1
    assert slurm_cluster.job_info(f"{array}_0")["Restarts"] == "0"  # the requeue was the task's, not the array's
    stopped = int(re.search(r"stopped at step (\d+)/64", log1).group(1))
    assert f"resumed from {runs / 'grid-1' / 'checkpoints' / f'step-{stopped:08d}'}" in log1, log1
    assert sorted(p.name for p in runs.iterdir()) == ["grid-0", "grid-1"]
    _trained_to_the_end_once(runs / "grid-0")
    _trained_to_the_end_once(runs / "grid-1", stopped)
    for line, (lr, betas) in enumerate([(0.0001, [0.5, 0.999]), (0.0003, [0.3, 0.999])]):
        cfg = yaml.safe_load((runs / f"grid-{line}" / "config.yaml").read_text())
        assert (cfg["train"]["lr"], cfg["train"]["betas"], cfg["run"]["name"]) == (lr, betas, "smoke")
        (first, *_rest) = [read_offline_run(f) for f in offline_run_files(runs / f"grid-{line}")]
        assert first.name == f"smoke-{array}_{line}"  # the array task tells the runs of one run.name apart
    assert len({r.run_id for r in map(read_offline_run, offline_run_files(runs / "grid-1"))}) == 1


def test_a_sweep_array_that_cannot_run_says_why(slurm_cluster, tmp_path):
    trials, bad = tmp_path / "one.txt", tmp_path / "bad.txt"
    trials.write_text("train.lr=0.0001\n")
    bad.write_text("train.lr=fast\n")
    jobs = {
        "bad line": _submit(slurm_cluster, tmp_path, ["--lines", str(bad), "--config", str(SMOKE)], "0", {}),
        "beyond": _submit(slurm_cluster, tmp_path, ["--lines", str(trials), "--config", str(SMOKE)], "1", {}),
        "bad args": _submit(
            slurm_cluster, tmp_path, ["--lines", str(trials), "--config", str(SMOKE), "train.nope=1"], "0", {}
        ),
        "extra args": _submit(slurm_cluster, tmp_path, ["me/p/swp", "train.lr=1"], "0", {}),
    }
    expected = {
        "beyond": f"error: array task 1, but {trials} has 1 trial lines; submit with --array=0-0",
        "bad args": "error: unknown config key 'train.nope' (on the command line)",
        "bad line": f"error: line 0 of {bad} ('train.lr=fast'): bad value for 'train.lr'",
        "extra args": "error: the W&B form takes one argument, the sweep",
    }
    for what, array in jobs.items():
        job = f"{array}_{1 if what == 'beyond' else 0}"
        assert slurm_cluster.wait(job, timeout=60) == "FAILED", slurm_cluster.job_report(job)
        assert slurm_cluster.job_info(job)["ExitCode"] == "2:0"
        log = _log(tmp_path, array, 1 if what == "beyond" else 0)
        assert expected[what] in log and "accelerate launch" not in log, log
