"""W&B sweeps: the trainer under `wandb agent`, the sweep configs, and trials that stay apart.

There is no W&B server here. The agent is W&B's own code run by tests/sweep_agent_standin.py: its
`Agent._command_run` starts each trial with the command line and environment `wandb agent` gives
it, the sweeps engine (`sweeps`, W&B's, as `pip install wandb[sweeps]` installs it) validates the
sweep config and proposes the trials, and the server's requeue rule is applied to the offline run.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_NETS, TRAIN, read_metrics, trainer_env
from tests.sweep_agent_standin import server_runs, sweep_environment
from tests.wandb_offline import offline_run_files, read_offline_run
from trainer.core.config import ConfigError, load_config, parse_args
from trainer.monitor import wandb_sink as sweep
from trainer.monitor.run_lock import LOCK_FILE, RunLock
from trainer.monitor.stopping import STOP_FILE_ENV
from trainer.monitor.wandb_sink import display_name, run_display_name

# W&B's sweeps engine (2022) under pydantic 2 and a current scikit-learn: their warnings, not ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Support for class-based `config` is deprecated"),
    pytest.mark.filterwarnings("ignore:Valid config keys have changed in V2:UserWarning"),
    pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning"),
]

SWEEPS = REPO / "configs" / "sweeps"
LR_BETA1 = SWEEPS / "lr_beta1.yaml"
# Tiny settings through $DCGAN_OVERRIDES, applied after the sweep's command line (as tests/test_readme.py
# does): 10 steps an epoch, 2 epochs, an evaluation every epoch with the stand-in feature extractor.
TINY = [
    *TINY_NETS,
    "data.fake_size=160",
    "train.batch_size=16",
    "train.epochs=2",
    "train.mixed_precision=no",
    "ckpt.every_steps=5",
    "log.every_steps=5",
    "log.sample_every_steps=10",
    "log.sample_grid_size=16",
    "eval.every_epochs=1",
    "eval.feature_extractor=tests.standin_extractor:StandInExtractor",
    "eval.num_samples=32",
    "eval.batch_size=32",
    "eval.kid_subsets=4",
    "eval.kid_subset_size=16",
]


def _sweep_configs() -> list[Path]:
    return sorted(SWEEPS.glob("*.yaml"))


# ---- the command line: what agents pass ---------------------------------------------------------------
def _agent_arguments(params: dict) -> dict[str, list[str]]:
    """The argument forms W&B's agent makes of a trial's parameters (its own function)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    return create_sweep_command_args({"args": {key: {"value": value} for key, value in params.items()}})


def test_the_trainer_reads_every_argument_form_a_wandb_agent_passes():
    params = {"train.lr": 0.00031, "train.betas.0": 0.25, "run.seed": 3, "train.compile": False}
    forms = _agent_arguments(params)
    base = ["--config", str(REPO / "configs" / "dcgan_cifar10.yaml")]
    configs = {name: parse_args([*base, *forms[name]]) for name in ("args", "args_no_hyphens", "args_no_equals")}
    for name, cfg in configs.items():
        assert (cfg.train.lr, cfg.train.betas, cfg.run.seed, cfg.train.compile) == (0.00031, [0.25, 0.999], 3, False), (
            name
        )
    assert forms["args"][0] == "--train.lr=0.00031"  # the agent's default command: "unrecognized arguments" before
    # Options of the trainer itself keep their meaning beside them; a dashed key without a value says so.
    with pytest.raises(ConfigError, match="--train.lr has no value; write train.lr=VALUE"):
        parse_args([*base, "--train.lr"])
    with pytest.raises(ConfigError, match="unknown config key 'train.nope'"):
        parse_args([*base, "--train.nope=1"])


def test_a_list_item_is_set_by_its_index():
    cfg = load_config(None, ["train.betas.0=0.3", "train.betas.1=0.99"])
    assert cfg.train.betas == [0.3, 0.99] and isinstance(cfg.train.betas[0], float)
    with pytest.raises(ConfigError, match=r"names item 2 of 'train.betas', which is a list of 2 items"):
        load_config(None, ["train.betas.2=0.3"])
    with pytest.raises(ConfigError, match=r"names item 0 of 'train.lr', which is not a list"):
        load_config(None, ["train.lr.0=0.3"])
    with pytest.raises(ConfigError, match=r"bad value for 'train.betas.0'"):
        load_config(None, ["train.betas.0=high"])
    with pytest.raises(ConfigError, match=r"train.betas=\[1.5, 0.999\] must be two numbers in \[0, 1\)"):
        load_config(None, ["train.betas.0=1.5"])  # validated like any other value


# ---- the sweep configs: W&B's own validation, and commands the trainer accepts -------------------------
@pytest.mark.parametrize("path", _sweep_configs(), ids=lambda p: p.name)
def test_sweep_configs_pass_wandbs_validation_and_their_trials_parse(path):
    import sweeps

    config = yaml.safe_load(path.read_text())
    assert sweeps.schema_violations_from_proposed_config(config) == [], path
    filled = sweeps.SweepConfig(config)  # raises on what the schema refuses
    assert filled["metric"] == {"name": sweep.METRIC, "goal": "minimize"}  # what the trainer logs (see below)

    # The command as W&B's agent builds it, for trials its engine proposes: `accelerate launch` of the
    # trainer, whose command line (after the program) the trainer accepts with the proposed values.
    from wandb.sdk.launch.sweeps.utils import create_sweep_command

    runs = []
    for _ in range(3):
        proposal = sweeps.next_run(filled, runs)
        params = {key: item["value"] for key, item in proposal.config.items()}
        forms = {**_agent_arguments(params), "program": [config["program"]], "env": ["/usr/bin/env"]}
        command = []
        for chunk in create_sweep_command(list(config["command"])):
            command += forms[chunk[2:-1]] if chunk.startswith("${") else [chunk]
        assert command[:3] == ["/usr/bin/env", "accelerate", "launch"], command
        trainer_args = command[command.index("trainer/train.py") + 1 :]
        cfg = parse_args(trainer_args)
        for key, value in params.items():
            got = cfg.train.betas[0] if key == "train.betas.0" else functools.reduce(getattr, key.split("."), cfg)
            assert got == pytest.approx(value), key
        runs.append(sweeps.SweepRun(name=f"r{len(runs)}", state=sweeps.RunState.finished, config=proposal.config))


def test_the_lr_beta1_sweep_is_a_bayesian_search_with_early_termination():
    config = yaml.safe_load(LR_BETA1.read_text())
    assert config["method"] == "bayes" and config["early_terminate"]["type"] == "hyperband"
    assert set(config["parameters"]) == {"train.lr", "train.betas.0"}
    assert "${args_no_hyphens}" in config["command"] and "configs/dcgan_cifar10.yaml" in config["command"]


def test_wandbs_validation_can_fail():
    import sweeps

    bad = yaml.safe_load(LR_BETA1.read_text())
    bad["parameters"]["train.lr"] = {"distribution": "log_uniform_values", "min": 0.001, "max": 0.0001}
    bad["early_terminate"] = {"type": "median"}
    violations = sweeps.schema_violations_from_proposed_config(bad)
    assert any("min 0.001 is not less than max 0.0001" in v for v in violations), violations
    assert any("median" in v for v in violations), violations


def test_the_trials_files_parse_line_by_line():
    for path in SWEEPS.glob("*.txt"):
        lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        assert lines, path
        for line in lines:
            parse_args(["--config", str(REPO / "configs" / "dcgan_cifar10.yaml"), *line.split()])


# ---- a trial: detection, directory, W&B run, name ----------------------------------------------------------
def _param_file(path: Path, params: dict) -> Path:
    """The agent's param file, written by W&B's own function (wandb_agent.Agent._command_run uses it)."""
    from wandb.sdk.lib import config_util

    config_util.save_config_file_from_dict(str(path), {key: {"value": value} for key, value in params.items()})
    return path


def test_a_trial_is_known_by_the_agents_environment_and_trains_in_its_own_directory(tmp_path):
    params = {"train.lr": 0.00031, "train.betas.0": 0.42}
    env = {
        "WANDB_SWEEP_ID": "sw1",
        "WANDB_RUN_ID": "abc123de",
        "WANDB_SWEEP_PARAM_PATH": str(_param_file(tmp_path / "config-abc123de.yaml", params)),
    }
    trial = sweep.current_trial(env)
    assert trial == sweep.Trial("sw1", "abc123de", params)
    assert sweep.current_trial({"WANDB_RUN_ID": "abc123de"}) is None  # a run id alone is no sweep
    cfg = load_config(None, ["run.name=s"])
    assert sweep.place(cfg, trial).run.dir == "runs/s/abc123de" and cfg.run.dir == "runs/s"
    assert sweep.place(cfg, None) is cfg
    named = load_config(None, ["run.dir=/scratch/s/abc123de"])
    assert sweep.place(named, trial).run.dir == "/scratch/s/abc123de"  # already the trial's
    with pytest.raises(ConfigError, match="cannot name a run directory"):
        sweep.current_trial({**env, "WANDB_RUN_ID": "../x"})
    init = {"id": "zzz", "project": "p", "entity": "e", "name": "n", "resume": "allow"}
    assert sweep.join_agent_run(init) == {"name": "n", "resume": "allow"}  # W&B takes the agent's
    assert run_display_name(cfg, env) == "s/abc123de lr=0.00031 betas.0=0.42"


def test_only_a_stop_through_the_job_scripts_channel_requeues_a_trial(tmp_path):
    job_file = tmp_path / "stop"
    env = {STOP_FILE_ENV: str(job_file)}
    assert sweep.requeue_wanted(f"{tmp_path}/STOP exists", env) and sweep.requeue_wanted("SIGUSR1", env)
    assert not sweep.requeue_wanted("SIGTERM", env) and not sweep.requeue_wanted(None, env)
    job_file.touch()  # Slurm's SIGTERM, which the job script turns into its file as well
    assert sweep.requeue_wanted("SIGTERM", env)


def test_display_names_tell_runs_that_share_a_name_apart():
    assert display_name("a") == "a"
    assert display_name("a", slurm_job="4240_3") == "a-4240_3"
    assert display_name("a", seed=2, slurm_job="7") == "a-7 seed=2"
    assert display_name("a", seed=0) == "a"
    trial = display_name("a", trial_id="k3j9x2ab", seed=0, overrides={"train.lr": 0.000310248, "train.betas.0": 0.4})
    assert trial == "a/k3j9x2ab lr=0.0003102 betas.0=0.4"
    assert display_name("a", trial_id="t", seed=5, overrides={"run.seed": 5}) == "a/t seed=5"  # once
    assert display_name("a", overrides={"train.betas": [0.5, 0.999]}) == "a betas=[0.5,0.999]"
    long = display_name("a", overrides={f"x.k{i}": 1.0 for i in range(40)})
    assert len(long) == 128 and long.endswith("...")


# ---- trials as the agent runs them ----------------------------------------------------------------------------
def _agent(work: Path, runs: Path, count: int, **extra: str) -> subprocess.CompletedProcess:
    """`wandb agent --count N <entity>/<project>/<sweep>` from the repository root, as a user runs it."""
    env = trainer_env()
    env.update(sweep_environment(work, LR_BETA1, runs))
    env.update(
        DCGAN_OVERRIDES=" ".join([*TINY, f"run.dir={runs}", f"eval.cache_dir={work / 'stats'}"]),
        HF_HOME=str(work / "hf"),  # no accelerate default config of this machine's user: one CPU process
        **extra,
    )
    proc = subprocess.run(
        ["wandb", "agent", "--count", str(count), "me/dcgan-trainer/swp1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_trials_run_apart_in_the_agents_runs_and_a_requeued_trial_resumes(tmp_path):
    work, runs = tmp_path / "work", tmp_path / "runs"
    # First agent: its trial's job script asks for a checkpoint and a requeue (the file the Slurm
    # array's warning signal creates), from the start: the trial stops at its first stop check.
    job_file = tmp_path / "job-stop"
    job_file.touch()
    first = _agent(work, runs, 1, **{STOP_FILE_ENV: str(job_file)})
    (a,) = server_runs(work)
    assert a["state"] == "preempted", first.stdout[-3000:]
    assert f"stopped at step 10/20 ({job_file} exists); W&B requeues this trial" in first.stdout
    job_file.unlink()
    # Second agent, two trials: W&B hands the requeued one back first, then a new proposal.
    second = _agent(work, runs, 2)
    a_again, b = server_runs(work)
    assert a_again["id"] == a["id"] and a_again["state"] == b["state"] == "finished", second.stdout[-3000:]
    assert "refus" not in (first.stdout + second.stdout + second.stderr).lower()

    # Two run directories, <run.dir>/<W&B run id>, each trained to the end with its own parameters.
    assert sorted(p.name for p in runs.iterdir()) == sorted([a["id"], b["id"]])
    for trial in (a, b):
        run_dir = runs / trial["id"]
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["run"]["dir"] == str(run_dir)
        assert cfg["train"]["lr"] == pytest.approx(trial["params"]["train.lr"])
        assert cfg["train"]["betas"][0] == pytest.approx(trial["params"]["train.betas.0"])
        assert [m["step"] for m in read_metrics(run_dir) if "loss_D" in m] == [5, 10, 15, 20]  # no step twice
    assert f"resumed from {runs / a['id'] / 'checkpoints' / 'step-00000010'}" in second.stdout

    # W&B: the agent's runs (its run ids, joined to the sweep), one run across the requeue, named by trial.
    starts = [read_offline_run(f) for f in offline_run_files(runs / a["id"])]
    (b_run,) = [read_offline_run(f) for f in offline_run_files(runs / b["id"])]
    assert [r.run_id for r in starts] == [a["id"], a["id"]] and b_run.run_id == b["id"]
    assert {r.sweep_id for r in [*starts, b_run]} == {"swp1"} and {r.project for r in [*starts, b_run]} == {
        "dcgan-trainer"
    }
    assert (starts[0].preempting, starts[0].exit_code) == (True, sweep.REQUEUE_EXIT_CODE)  # W&B requeues it
    assert (starts[1].preempting, starts[1].exit_code, b_run.exit_code) == (False, 0, 0)
    lr, beta1 = b["params"]["train.lr"], b["params"]["train.betas.0"]
    assert re.fullmatch(
        rf"sweep_lr_beta1/{b['id']} (betas\.0={beta1:.4g} lr={lr:.4g}|lr={lr:.4g} betas\.0={beta1:.4g})", b_run.name
    )
    assert b_run.config["train.lr"] == pytest.approx(lr)  # the agent's parameters, as W&B records them
    # The sweep's metric is logged under the name the sweep config gives it: one value per evaluation.
    metric = yaml.safe_load(LR_BETA1.read_text())["metric"]["name"]
    fids = [row[metric] for row in b_run.rows_with(metric)]
    assert len(fids) == 2 and fids == [m["fid"] for m in read_metrics(runs / b["id"]) if "fid" in m]
    assert b["history"] == [{metric: fid} for fid in fids]  # what the search and hyperband read

    # The start shows the compact config, and the evaluation line names what the stand-in measured.
    assert "train.lr" in second.stdout and "train.betas " in second.stdout and "ckpt.keep" not in second.stdout
    assert "the keys that differ from the defaults" in second.stdout
    assert re.search(r"eval step 20 epoch 2 \| FID \S+ \| classifier score ", second.stdout), second.stdout[-2000:]
    assert f"W&B sweep swp1, trial {b['id']}" in second.stdout


@pytest.mark.slow
def test_a_trial_whose_directory_is_in_use_is_refused_before_it_touches_it(tmp_path):
    runs = tmp_path / "runs"
    lock = RunLock(runs / "abc123de").acquire()  # a live start of the same trial
    try:
        env = trainer_env()
        env.update(
            WANDB_SWEEP_ID="swp1",
            WANDB_RUN_ID="abc123de",
            DCGAN_OVERRIDES=" ".join([*TINY, f"run.dir={runs}"]),
        )
        proc = subprocess.run(
            [sys.executable, str(TRAIN), "--config", "configs/smoke.yaml", "--train.lr=0.0003"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert [p.name for p in (runs / "abc123de").iterdir()] == [LOCK_FILE]  # nothing written beside it
    finally:
        lock.release()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"{runs / 'abc123de'} is in use by another training run (pid {os.getpid()}" in proc.stderr, proc.stderr
