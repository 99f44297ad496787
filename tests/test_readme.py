"""The commands of the README and of the docs pages, run in order as a new user pastes them; their links.

How (docs/testing.md): the repository is copied into a temporary directory with a virtual
environment of its own, which sees the packages of the interpreter running the tests (the system
Python's or a virtual environment's) but installs into itself, with no package index; the README's
`pip install` and `make train` lines then install the copy there and nowhere else. Every ```bash
block runs in order, in one `bash -e` each, and every ```python block with the environment's
python; each must exit 0. The README comes first, then the docs pages in name order, in the same
copy (a page may use the run the README's commands made). The commands are the pages' own: the tiny
sizes come through $DCGAN_OVERRIDES, which every tool applies after its command line. A block
preceded by `<!-- not-tested: reason -->` is not run, but the `runs/...` paths it reads must exist
by then.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_NETS

README = REPO / "README.md"
DOCS = REPO / "docs"
# Pages whose commands another harness runs: not pasted here.
OWN_HARNESS = {
    "docs/gpu.md": "the GPU check's page: its commands need a CUDA machine; tests/test_acceptance.py runs the check "
    "at toy size on the CPU",
}
NOT_TESTED = re.compile(r"^\s*<!--\s*not-tested:\s*(?P<reason>.+?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>\w*)\s*$")
TINY = [
    *TINY_NETS,
    "data.fake_size=48",
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
    page: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_tested: str | None  # the reason, for a block that is not run

    @property
    def where(self) -> str:
        return f"{self.page} line {self.line}"


def command_blocks(text: str, page: str = "README.md") -> list[Block]:
    """The ```bash and ```python blocks of a page, in order, with their not-tested reasons."""
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
            blocks.append(Block(page, i + 1, lang, code + "\n", marker["reason"] if marker else None))
        i = end + 1
    return blocks


def pages() -> list[Path]:
    """The README, then every docs page, in the order their commands run."""
    return [README, *sorted(DOCS.glob("*.md"))]


def all_blocks() -> list[Block]:
    found = []
    for path in pages():
        page = str(path.relative_to(REPO))
        if page not in OWN_HARNESS:
            found += command_blocks(path.read_text(), page)
    return found


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


def _running_site_dirs() -> list[str]:
    """The site-packages directories of the interpreter running the tests: a virtual environment's
    (and its base's, if it sees them), or the system Python's; the user site if it is on sys.path."""
    dirs = [*site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if d in sys.path]


def _make_venv(venv: Path) -> None:
    """A virtual environment that installs into itself and sees the running interpreter's packages.

    `venv --system-site-packages` would show the *base* interpreter's packages, which inside an
    activated virtual environment are not the ones the tests run with (torch may be missing there).
    A .pth file instead adds the running interpreter's own site directories (their .pth files
    processed, as for any site directory), after the environment's own: what pip installs here wins.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    own_site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    dirs = ", ".join(repr(d) for d in _running_site_dirs())
    (own_site / "_outer_site.pth").write_text(f"import site; list(map(site.addsitedir, ({dirs},)))\n")
    # Commands of packages installed in the running environment, run by this environment's python
    # (pip installs into it; accelerate's workers then see what pip installed here).
    for name, module in (("pip", "pip"), ("accelerate", "accelerate.commands.accelerate_cli")):
        shim = venv / "bin" / name
        shim.write_text(f'#!/bin/sh\nexec "$(dirname "$0")/python" -m {module} "$@"\n')
        shim.chmod(0o755)


def _environment(root: Path) -> dict[str, str]:
    """A virtual environment in `root`/venv and the variables of a new user's shell that uses it."""
    venv = root / "venv"
    _make_venv(venv)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("WANDB_", "SLURM_", "PIP_", "DCGAN_", "ACCELERATE_", "PYTHON", "CONDA"))
        and key not in ("VIRTUAL_ENV", "NETRC", "TORCH_HOME", "HF_HOME")
    }
    home = root / "home"
    home.mkdir()
    # Other commands of the running environment (wandb, tensorboard) stay reachable after the venv's own.
    path = [str(venv / "bin"), sysconfig.get_path("scripts"), os.environ.get("PATH", "")]
    env.update(
        HOME=str(home),  # no W&B credentials, no accelerate config: a new user's machine
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_CONFIG_HOME=str(home / ".config"),
        VIRTUAL_ENV=str(venv),
        PATH=os.pathsep.join(path),
        PIP_NO_INDEX="1",  # everything is installed already; the pages' pip lines must still succeed
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


def _own_runs(code: str) -> set[str]:
    """Run directories a block makes itself: run.name=, run.dir=runs/..., --out runs/..., a config's run name."""
    names = set(re.findall(r"run\.name=([\w.-]+)", code))
    names |= set(re.findall(r"(?:run\.dir=|--out )runs/([\w.-]+)", code))
    for config in re.findall(r"--config (configs/[\w.-]+\.yaml)", code):
        names |= set(re.findall(r"^\s*name:\s*([\w.-]+)", (REPO / config).read_text(), re.MULTILINE))
    return names


def _paths_exist(block: Block, workdir: Path) -> list[str]:
    """The `runs/...` paths of a block that is not run, and that it does not make: they must exist."""
    own = _own_runs(block.code)
    return [
        path
        for path in re.findall(r"runs/[^\s'\"`)]+", block.code)
        if path.split("/")[1] not in own and not list(workdir.glob(path))
    ]


def test_command_blocks_are_found_and_the_exceptions_are_few():
    blocks = all_blocks()
    readme = [b for b in blocks if b.page == "README.md"]
    assert sum(b.lang == "bash" and not b.not_tested for b in readme) >= 4
    assert any("make train" in b.code and not b.not_tested for b in readme)
    assert any("configs/smoke.yaml" in b.code and not b.not_tested for b in readme[:2])  # the first screen
    run_pages = {b.page for b in blocks if not b.not_tested}
    assert {"docs/configuration.md", "docs/data.md", "docs/evaluation.md"} <= run_pages
    skipped = [b.where for b in blocks if b.not_tested]
    assert len(skipped) <= 19, skipped  # each needs hardware, an account, a server, real data or hours
    assert set(OWN_HARNESS) <= {str(p.relative_to(REPO)) for p in pages()}


# ---- links ----------------------------------------------------------------------------------------
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)  # no headings inside code
    return {github_anchor(m[1]) for m in re.finditer(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no {resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor})")
    return broken


def test_relative_links_of_the_readme_and_the_docs_resolve():
    broken = {str(p.relative_to(REPO)): broken_links(p) for p in pages()}
    assert not {page: links for page, links in broken.items() if links}


def test_the_link_check_sees_a_missing_page_and_a_missing_heading(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## W&B: log in, or log offline\n")
    page.write_text(
        "[ok](other.md#wb-log-in-or-log-offline) [web](https://example.org/x) ![img](nope.png)\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere) [self](#other-page)\n\n# Page\n"
    )
    assert [b.split(" (")[0] for b in broken_links(page)] == [
        "nope.png",
        "missing.md",
        "other.md#nowhere",
        "#other-page",
    ]


# ---- the commands ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_commands_of_the_readme_and_the_docs_run_in_order(tmp_path):
    workdir = tmp_path / "dcgan-trainer"
    workdir.mkdir()
    _copy_repository(workdir)
    env = _environment(tmp_path)
    python = str(tmp_path / "venv" / "bin" / "python")
    for block in all_blocks():
        if block.not_tested:
            missing = _paths_exist(block, workdir)
            assert not missing, f"{block.where} (not run: {block.not_tested}) names {missing}, absent"
            continue
        command = ["bash", "-e", "-c", block.code] if block.lang == "bash" else [python, "-c", block.code]
        started = time.perf_counter()
        proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
        print(f"{block.where}: {time.perf_counter() - started:.1f}s", flush=True)
        assert proc.returncode == 0, (
            f"{block.where} ({block.lang}) exited {proc.returncode}:\n{block.code}\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )
    # The first command's run, then the classic run that the README and the docs pages share.
    runs = sorted(p.name for p in (workdir / "runs").iterdir())
    assert {"smoke", "dcgan_cifar10"} <= set(runs) and "dcgan" not in runs, runs
    assert list((workdir / "runs" / "smoke" / "samples").glob("epoch_*.png"))
    assert list((workdir / "runs" / "smoke" / "wandb").glob("offline-run-*"))  # the dashboard, offline
    run = workdir / "runs" / "dcgan_cifar10"
    assert (run / "generator.safetensors").is_file() and list((run / "eval").glob("*.json"))
    assert (workdir / "samples.npz").is_file() and (workdir / "walk.gif").is_file()
    # The pages' pip lines installed the copy into the test's environment, console scripts included.
    assert (tmp_path / "venv" / "bin" / "dcgan-train").is_file()
