"""`wandb agent [--count N] <entity>/<project>/<sweep id>` where there is no W&B server: for tests.

Installed as `wandb` on the PATH of a test (`install`), it stands in for the server and the agent of
a sweep, using W&B's own code wherever it can:
- the server's search: the sweep config in `$SWEEP_STANDIN_DIR/sweep.yaml`, validated by W&B's
  sweeps engine (`sweeps.SweepConfig`), which also proposes each new trial (`sweeps.next_run`,
  Bayesian search included) from the trials so far (their parameters and metric history);
- the agent: W&B's `wandb_agent.Agent._command_run` starts the trial exactly as `wandb agent`
  does: WANDB_SWEEP_ID, WANDB_RUN_ID, WANDB_SWEEP_PARAM_PATH (and WANDB_DIR, WANDB_ENTITY,
  WANDB_PROJECT) in its environment, its parameters written to the param file, the sweep's
  `command:` with its macros expanded by W&B's `create_sweep_command(_args)`;
- the server's requeue rule: a trial whose W&B run was marked preempting and ended with a non-zero
  exit code (read back from its offline run file under `$SWEEP_STANDIN_RUNS`) goes back to the
  queue, and the next agent gets the same run id; any other ending is final.

The state (`$SWEEP_STANDIN_DIR/runs.json`: run id, parameters, state, metric history) is shared
by every agent of the test under a file lock, as the server is by the agents of a sweep.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import string
import sys
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def install(bin_dir: Path) -> Path:
    """A `wandb` command in `bin_dir` that runs this stand-in with this interpreter; returns its path."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    command = bin_dir / "wandb"
    command.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" "$@"\n')
    command.chmod(0o755)
    return command


def sweep_environment(work: Path, sweep_yaml: Path, runs_root: Path) -> dict[str, str]:
    """What a test adds to the environment of `wandb agent` (after `install(work / "bin")`): the stand-in
    first on PATH, its server state and the sweep config it holds, where the trials' runs are, and the
    agent's working files (W&B's WANDB_DIR: the param files) in `work`, not in the repository."""
    server = work / "server"
    server.mkdir(parents=True, exist_ok=True)
    (server / "sweep.yaml").write_text(sweep_yaml.read_text())
    (work / "agent").mkdir(exist_ok=True)
    return {
        "PATH": os.pathsep.join([str(install(work / "bin").parent), os.environ.get("PATH", "")]),
        "SWEEP_STANDIN_DIR": str(server),
        "SWEEP_STANDIN_RUNS": str(runs_root),
        "WANDB_DIR": str(work / "agent"),
    }


def server_runs(work: Path) -> list[dict]:
    """The trials the stand-in server knows: id, params, state (running, preempted, finished, failed), history."""
    path = work / "server" / "runs.json"
    return json.loads(path.read_text())["runs"] if path.exists() else []


@contextmanager
def _server(state_dir: Path):
    """The shared state, locked: {"runs": [{"id", "params", "state", "history"}]}."""
    with open(state_dir / "runs.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = state_dir / "runs.json"
        state = json.loads(path.read_text()) if path.exists() else {"runs": []}
        yield state
        path.write_text(json.dumps(state, indent=1))


def _sweep_runs(runs: list[dict]):
    import sweeps

    state = {"running": sweeps.RunState.running, "preempted": sweeps.RunState.preempted}
    return [
        sweeps.SweepRun(
            name=run["id"],
            state=state.get(run["state"], sweeps.RunState.finished),
            config={key: {"value": value} for key, value in run["params"].items()},
            history=run["history"],
            summary_metrics={},
        )
        for run in runs
    ]


def _next_trial(state_dir: Path, config: dict) -> dict:
    """A requeued (preempted) trial first, as W&B hands them out; else a new proposal of the sweeps engine."""
    import sweeps

    with _server(state_dir) as state:
        for run in state["runs"]:
            if run["state"] == "preempted":
                run["state"] = "running"
                return run
        proposal = sweeps.next_run(sweeps.SweepConfig(config), _sweep_runs(state["runs"]))
        params = {key: item["value"] for key, item in proposal.config.items()}
        params = {key: value.item() if hasattr(value, "item") else value for key, value in params.items()}
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        run = {"id": run_id, "params": params, "state": "running", "history": []}
        state["runs"].append(run)
        return run


def _ending(runs_root: Path, run_id: str, exit_code: int) -> tuple[str, list[dict]]:
    """The trial's state as W&B's server records it, from the run's newest offline file, and its metric rows."""
    sys.path.insert(0, str(REPO))
    from tests.wandb_offline import read_offline_run

    files = sorted(runs_root.rglob(f"offline-run-*-{run_id}/run-{run_id}.wandb"), key=lambda p: p.parent.name)
    if not files:
        return ("failed" if exit_code else "finished"), []
    run = read_offline_run(files[-1])
    history = [row for path in files for row in read_offline_run(path).history]
    if run.preempting and run.exit_code:
        return "preempted", history
    return ("finished" if run.exit_code == 0 else "failed"), history


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "agent":
        print(f"wandb (test stand-in): only `wandb agent` is here, not {argv[:1]}", file=sys.stderr)
        return 2
    args, count = argv[1:], None
    if args[:1] == ["--count"]:
        count, args = int(args[1]), args[2:]
    (sweep_path,) = args
    import wandb
    import yaml
    from wandb import wandb_agent
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    parts = {"name": sweep_path}
    assert sweep_utils.parse_sweep_id(parts) is None, sweep_path
    # What `wandb.wandb_agent.run_agent` sets before it starts the agent.
    if parts["entity"]:
        wandb.env.set_entity(parts["entity"])
    if parts["project"]:
        wandb.env.set_project(parts["project"])
    os.environ[wandb.env.SWEEP_ID] = parts["name"]

    state_dir = Path(os.environ["SWEEP_STANDIN_DIR"])
    runs_root = Path(os.environ["SWEEP_STANDIN_RUNS"])
    config = yaml.safe_load((state_dir / "sweep.yaml").read_text())
    metric = config["metric"]["name"]
    # The agent outlives SIGTERM (it waits for its trial, which gets the signal too): as wandb's does.
    signal.signal(signal.SIGTERM, lambda signum, frame: print("wandb agent (stand-in): SIGTERM, waiting", flush=True))

    agent = wandb_agent.Agent(api=None, queue=None, sweep_id=parts["name"])
    agent._sweep_command = list(config.get("command") or [])
    done = 0
    while count is None or done < count:
        trial = _next_trial(state_dir, config)
        print(f"wandb agent (stand-in): run {trial['id']} of sweep {parts['name']}: {trial['params']}", flush=True)
        command = {
            "type": "run",
            "run_id": trial["id"],
            "program": config.get("program"),
            "args": {key: {"value": value} for key, value in trial["params"].items()},
        }
        agent._command_run(command)
        process = agent._run_processes.pop(trial["id"])
        while True:
            try:
                exit_code = process.wait()
                break
            except InterruptedError:
                continue
        ending, history = _ending(runs_root, trial["id"], exit_code)
        with _server(state_dir) as state:
            for run in state["runs"]:
                if run["id"] == trial["id"]:
                    run["state"] = ending
                    run["history"] = [{metric: row[metric]} for row in history if metric in row]
        print(f"wandb agent (stand-in): run {trial['id']} exited {exit_code}: {ending}", flush=True)
        done += 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
