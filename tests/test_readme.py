"""The README's commands, run in order as a new user pastes them after the quickstart.

How (docs/testing.md): the repository is copied into a temporary directory with a virtual
environment of its own (the machine's packages visible, no package index), so the README's
`pip install` and `make train` lines install the copy there and nowhere else. Every ```bash block
runs in order, in one `bash -e` each, and every ```python block with the environment's python;
each must exit 0. The commands are the README's own: the tiny sizes come through
$DCGAN_OVERRIDES, which every tool applies after its command line. A block preceded by
`<!-- not-tested: reason -->` is not run, but the `runs/...` paths it names must exist by then.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
NOT_TESTED = re.compile(r"^\s*<!--\s*not-tested:\s*(?P<reason>.+?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>\w*)\s*$")
TINY = [
    "data.source=fake",
    "data.fake_size=48",
    "data.num_workers=0",
    "model.resolution=32",
    "model.nz=16",
    "model.ngf=8",
    "model.ndf=8",
    "train.batch_size=16",
    "train.epochs=1",
    "train.mixed_precision=no",
    "log.every_steps=3",
    "log.sample_every_steps=3",
    "log.sample_grid_size=16",
    "eval.feature_extractor=tests.standin_extractor:StandInExtractor",
    "eval.num_samples=32",
    "eval.batch_size=32",
    "eval.kid_subsets=4",
    "eval.kid_subset_size=16",
]


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_tested: str | None  # the reason, for a block that is not run


def readme_blocks(text: str) -> list[Block]:
    """The ```bash and ```python blocks, in order, with their not-tested reasons."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, lang = opening["indent"], opening["lang"]
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        if lang in ("bash", "python"):
            previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = NOT_TESTED.match(previous)
            code = "\n".join(line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end])
            blocks.append(Block(i + 1, lang, code + "\n", marker["reason"] if marker else None))
        i = end + 1
    return blocks


def _copy_repository(dst: Path) -> None:
    """The files a fresh clone would have, plus new ones not yet committed (not ignored ones)."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=False,
    )
    if listing.returncode != 0:  # not a git checkout: everything but what a run or a build makes
        ignore = shutil.ignore_patterns("runs", "data", "wandb", "build", "*.egg-info", "__pycache__", ".git")
        shutil.copytree(REPO, dst, ignore=ignore, dirs_exist_ok=True)
        return
    for name in filter(None, listing.stdout.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dst / name)


def _environment(root: Path) -> dict[str, str]:
    """A virtual environment in `root`/venv and the variables of a new user's shell that uses it."""
    venv = root / "venv"
    # Without pip of its own: the machine's pip and setuptools (system site-packages) install into it.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    pip = venv / "bin" / "pip"
    pip.write_text('#!/bin/sh\nexec "$(dirname "$0")/python" -m pip "$@"\n')
    pip.chmod(0o755)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("WANDB_", "SLURM_", "PIP_", "DCGAN_", "ACCELERATE_", "PYTHON", "CONDA"))
        and key not in ("VIRTUAL_ENV", "NETRC", "TORCH_HOME", "HF_HOME")
    }
    home = root / "home"
    home.mkdir()
    env.update(
        HOME=str(home),  # no W&B credentials, no accelerate config: a new user's machine
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_CONFIG_HOME=str(home / ".config"),
        VIRTUAL_ENV=str(venv),
        PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        PIP_NO_INDEX="1",  # everything is installed already; the README's pip lines must still succeed
        PIP_NO_DEPS="1",
        PIP_NO_BUILD_ISOLATION="0",  # pip's spelling of --no-build-isolation
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_QUIET="1",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONUNBUFFERED="1",
        DCGAN_OVERRIDES=" ".join([*TINY, f"eval.cache_dir={home / 'reference-stats'}"]),
    )
    return env


def _paths_exist(block: Block, workdir: Path) -> list[str]:
    """The `runs/...` paths of a block that is not run, and that nothing made: they must exist."""
    own_runs = set(re.findall(r"run\.name=([\w.-]+)", block.code))
    missing = []
    for path in re.findall(r"runs/[^\s'\"`)]+", block.code):
        if path.split("/")[1] not in own_runs and not list(workdir.glob(path)):
            missing.append(path)
    return missing


def test_readme_blocks_are_found_and_the_exceptions_are_few():
    blocks = readme_blocks(README.read_text())
    assert sum(b.lang == "bash" and not b.not_tested for b in blocks) >= 6
    assert any("make train" in b.code and not b.not_tested for b in blocks)
    skipped = [b for b in blocks if b.not_tested]
    assert len(skipped) <= 7, [b.line for b in skipped]  # each needs hardware, an account or a server


@pytest.mark.slow
def test_readme_commands_run_in_order(tmp_path):
    workdir = tmp_path / "dcgan-trainer"
    workdir.mkdir()
    _copy_repository(workdir)
    env = _environment(tmp_path)
    python = str(tmp_path / "venv" / "bin" / "python")
    log = []
    for block in readme_blocks(README.read_text()):
        if block.not_tested:
            missing = _paths_exist(block, workdir)
            assert not missing, f"README line {block.line} (not run: {block.not_tested}) names {missing}, absent"
            continue
        command = ["bash", "-e", "-c", block.code] if block.lang == "bash" else [python, "-c", block.code]
        started = time.perf_counter()
        proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
        log.append(f"README line {block.line}: {time.perf_counter() - started:.1f}s")
        print(log[-1], flush=True)
        assert proc.returncode == 0, (
            f"README line {block.line} ({block.lang}) exited {proc.returncode}:\n{block.code}\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )
    # The quickstart, the generator snippet, evaluation and sampling all used one run directory.
    runs = sorted(p.name for p in (workdir / "runs").iterdir())
    assert "dcgan_cifar10" in runs and "dcgan" not in runs, runs
    run = workdir / "runs" / "dcgan_cifar10"
    assert (run / "generator.safetensors").is_file() and list((run / "eval").glob("*.json"))
    assert (workdir / "samples.npz").is_file() and (workdir / "walk.gif").is_file()
    # The README's pip lines installed the copy into the test's environment, console scripts included.
    assert (tmp_path / "venv" / "bin" / "dcgan-train").is_file()
