"""What a run tells its user: the compact config at every start, --help's feature extractors, the name
of the IS column, and the documented DRY_RUN line of the Slurm launcher on a machine without Slurm."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from trainer.core.config import changed_keys, load_config
from trainer.evaluate import markdown_table
from trainer.monitor.console import Console
from trainer.quality.fid import score_label
from trainer.train import main as train_main


class _MainProcess:
    is_main_process = True


def test_a_start_prints_the_keys_that_differ_from_the_defaults(capsys):
    cfg = load_config(str(REPO / "configs" / "smoke.yaml"), ["train.lr=1e-4", "run.dir=/tmp/elsewhere"])
    changed = changed_keys(cfg)
    assert changed["train.lr"] == 1e-4 and changed["run.name"] == "smoke" and changed["run.dir"] == "/tmp/elsewhere"
    assert "train.betas" not in changed and "eval.num_samples" not in changed and "log.tracker" not in changed
    assert list(changed)[:2] == ["run.name", "run.dir"]  # schema order
    assert "run.dir" not in changed_keys(load_config(None, ["run.name=x"]))  # runs/<run.name> is the default
    assert changed_keys(load_config(str(REPO / "configs" / "dcgan_cifar10.yaml"))) == {}  # the classic recipe

    Console(_MainProcess()).config(changed, "runs/smoke/config.yaml")
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if re.match(r"^  [a-z_]+\.[a-z_]+ ", line)]
    assert [row[0] for row in rows] == list(changed) and ["train.lr", "0.0001"] in rows
    assert "the keys that differ from the defaults" in out and "runs/smoke/config.yaml holds every key" in out

    Console(_MainProcess()).config({}, "runs/x/config.yaml")
    assert capsys.readouterr().out.strip() == (
        "resolved config (runs/x/config.yaml): every key at its default (--help lists them)"
    )


def test_help_lists_the_offline_classifier_extractor(capsys):
    with pytest.raises(SystemExit):
        train_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "eval.feature_extractor" in out and "cifar10-classifier (this project's CIFAR-10 classifier, offline" in out
    assert "--train.lr=1e-4" in out and "train.betas.0=0.3" in out  # the agent's form and list items


def _report(extractor: str) -> dict:
    metrics = {"fid": 12.5, "is_mean": 6.1, "is_std": 0.2, "kid_mean": 0.01, "kid_std": 0.001}
    metrics.update(num_samples=1000, num_real=1000, kid_subset_size=100)
    settings = {"feature_extractor": extractor, "split": "train"}
    return {"checkpoint": "runs/x/checkpoints/step-1", "step": 1, "weights": "raw", "bn_stats": "running",
            "metrics": metrics, "settings": settings}  # fmt: skip


def test_the_evaluation_table_names_the_score_the_extractor_measured():
    classifier = markdown_table(_report("cifar10-classifier"))
    assert "| classifier score | 6.1000 ± 0.2000 |" in classifier and "Inception" not in classifier
    inception = markdown_table(_report("inception-v3-compat"))
    assert "| Inception Score | 6.1000 ± 0.2000 |" in inception
    assert (score_label("inception-v3-compat", short=True), score_label("cifar10-classifier", short=True)) == (
        "IS",
        "classifier score",
    )


def _documented(pattern: str) -> str:
    """The first match of `pattern` in the README or a docs page (the DRY_RUN line may live in either)."""
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        match = re.search(pattern, page.read_text())
        if match:
            return match.group(1)
    raise AssertionError(f"no {pattern!r} in README.md or docs/")


def _path_without_slurm(tmp_path: Path, scontrol: str | None) -> str:
    """A PATH with what node_launch.sh uses besides Slurm; `scontrol`: a stand-in script, or none at all."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sed", "head", "hostname", "date"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    if scontrol is not None:
        (bin_dir / "scontrol").write_text(f"#!{shutil.which('bash')}\n{scontrol}\n")
        (bin_dir / "scontrol").chmod(0o755)
    return str(bin_dir)


@pytest.mark.parametrize(
    "scontrol",
    [None, "echo 'scontrol: fatal: Could not establish a configuration source' >&2; exit 1"],
    ids=["no-scontrol", "slurm-without-a-cluster"],
)
def test_the_documented_dry_run_line_works_without_slurm(tmp_path, scontrol):
    line = _documented(r"`(DRY_RUN=1 [^`]*launch/slurm/node_launch\.sh[^`]*)`")
    expected = _documented(r"\n(accelerate launch --config_file launch/accelerate/multi_node\.yaml [^\n]*)\n")
    words = shlex.split(line)
    settings = dict(word.split("=", 1) for word in words[: words.index("bash")])
    env = {"PATH": _path_without_slurm(tmp_path, scontrol), "HOME": str(tmp_path), **settings}
    proc = subprocess.run(words[words.index("bash") :], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected and proc.stderr == ""


def test_dry_run_reads_the_first_host_off_any_host_list(tmp_path):
    path = _path_without_slurm(tmp_path, None)
    for nodelist, first in [("gpu[001-008]", "gpu001"), ("gpu[003,005-006]", "gpu003"), ("n7", "n7"),
                            ("a1,b[2-3]", "a1"), ("gpu[1-2]-ib,cpu3", "gpu1-ib")]:  # fmt: skip
        env = {"PATH": path, "DRY_RUN": "1", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": nodelist,
               "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "8",
               "ACCELERATE_CONFIG": "launch/accelerate/multi_node.yaml"}  # fmt: skip
        proc = subprocess.run(
            ["bash", "launch/slurm/node_launch.sh"], cwd=REPO, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0 and f" --main_process_ip {first} " in proc.stdout, (nodelist, proc.stdout)
