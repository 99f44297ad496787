"""Mutation check: do the fast tests notice plausible one-line bugs? Not part of CI (minutes of CPU).

Each mutant is one exact string replacement in one module. The script copies the tracked and
untracked-but-not-ignored files of the repository into a temporary directory, checks that every
test selection passes there unmutated, then for each mutant writes the mutated module into the
copy, runs its test selection (pytest -x, with a timeout), restores the module and reports whether
the tests failed (killed) or passed (SURVIVED). The working tree is never modified.

    python -m tools.mutation_check                   # every mutant
    python -m tools.mutation_check --only step,ckpt  # mutants whose id contains "step" or "ckpt"
    python -m tools.mutation_check --list            # the mutants, without running anything

When a module moves or a line changes, update MODULES or the mutant's `old` text: a replacement that
no longer matches exactly once is reported as `stale`, not silently skipped (and
tests/test_mutation_check.py fails, as it does for a test selection that names a missing test).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Where each mutated unit lives (update here when modules move).
MODULES = {
    "step": "trainer/core/step.py",
    "checkpoint": "trainer/core/checkpoint.py",
    "data": "trainer/core/data.py",
    "packed": "trainer/core/packed.py",
    "loop": "trainer/loop.py",  # the loop's decisions
    "meter": "trainer/monitor/measurements.py",  # MetricMeter
}

# The tests each mutant is checked against: fast ones unless the behaviour only shows end to end.
SELECTIONS = {
    "step": ["tests/test_step.py"],
    "checkpoint": ["tests/test_checkpoint.py", "-m", "not slow"],  # the decisions in process
    "data": ["tests/test_data.py", "tests/test_packed.py", "tests/test_cifar10.py", "-m", "not slow"],
    "meter": ["tests/test_metric_meter.py", "-m", "not slow"],
    "meter-2-ranks": ["tests/test_metric_meter.py"],  # + the two-process (gloo) check
    "rerun": ["tests/test_training.py::test_rerun_of_finished_run_resumes_and_trains_no_more"],
    "sigkill-resume": ["tests/test_training.py::test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run"],
    "eval-every-steps": ["tests/test_cifar10.py::test_default_data_path_trains_and_evaluates_every_n_steps"],
    "pickles": ["tests/test_reliability.py::test_checkpoint_with_code_in_a_pickle_is_refused"],
}


@dataclass(frozen=True)
class Mutant:
    id: str
    module: str  # a key of MODULES
    old: str  # must occur exactly once in the module
    new: str
    tests: str  # a key of SELECTIONS
    why: str  # the bug, in words


# One line a mutant, so the list reads (and diffs) as a table.
# fmt: off
MUTANTS = [
    # ---- the GAN step ----------------------------------------------------------------------------
    Mutant("step-g-target-flipped", "step", "return _bce(logits_after, 1.0)", "return _bce(logits_after, 0.0)", "step", "G trained towards 'fake'"),
    Mutant("step-d-labels-swapped", "step", "_bce(logits_real, 1.0) + _bce(logits_fake, 0.0)", "_bce(logits_real, 0.0) + _bce(logits_fake, 1.0)", "step", "D's real/fake labels swapped"),
    Mutant("step-d-loss-negated", "step", "return _bce(logits_real, 1.0) + _bce(logits_fake, 0.0)", "return -(_bce(logits_real, 1.0) + _bce(logits_fake, 0.0))", "step", "D loss sign wrong"),
    Mutant("step-d-real-only", "step", "return _bce(logits_real, 1.0) + _bce(logits_fake, 0.0)", "return _bce(logits_real, 1.0)", "step", "D never sees fakes"),
    Mutant("step-no-d-update", "step", "self.opt_d.step()", "pass", "step", "D optimizer step dropped"),
    Mutant("step-no-g-update", "step", "self.opt_g.step()", "pass", "step", "G optimizer step dropped"),
    Mutant("step-d-grads-accumulate", "step", "self.opt_d.zero_grad(set_to_none=True)", "pass", "step", "D gradients never cleared"),
    Mutant("step-g-grads-accumulate", "step", "self.opt_g.zero_grad(set_to_none=True)", "pass", "step", "G gradients never cleared"),
    Mutant("step-d-not-frozen", "step", "D.requires_grad_(False)", "pass", "step", "G step also computes D gradients"),
    Mutant("step-d-stays-frozen", "step", "D.requires_grad_(True)", "pass", "step", "D frozen after the first G step"),
    Mutant("step-noise-same-every-step", "step", "step_noise_seed(self.run_seed, step, attempt)", "step_noise_seed(self.run_seed, 0, attempt)", "step", "one noise batch for every step"),
    Mutant("step-noise-same-on-every-rank", "step", "z[rank * per_rank : (rank + 1) * per_rank]", "z[:per_rank]", "step", "every rank draws the same noise"),
    Mutant("step-noise-ignores-rollback", "step", "step_noise_seed(self.run_seed, step, attempt)", "step_noise_seed(self.run_seed, step)", "step", "a rollback replays the same noise"),
    # (`[run_seed, rank, step, attempt]` for every attempt would be equivalent: SeedSequence ignores trailing zeros.)
    Mutant("step-noise-seed-reordered", "step", "entropy = [run_seed, step]", "entropy = [step, run_seed]", "step", "seeds change across versions (resume drifts)"),
    Mutant("step-grad-norm-sum", "step", "return torch.linalg.vector_norm(torch.stack(norms))", "return torch.stack(norms).sum()", "step", "grad norm is a sum of norms"),
    Mutant("step-metric-dx-of-fakes", "step", '"D(x)": torch.sigmoid(real.float()).mean()', '"D(x)": torch.sigmoid(before.float()).mean()', "step", "D(x) logged from fakes"),
    Mutant("step-hinge-g-sign-flipped", "step", "return -logits_after.float().mean()", "return logits_after.float().mean()", "step", "hinge: G trained towards 'fake'"),
    Mutant("step-hinge-d-real-only", "step", "return F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean()", "return F.relu(1.0 - logits_real.float()).mean()", "step", "hinge: D never sees fakes"),
    # ---- checkpoints: the resume decision and the best checkpoint ---------------------------------
    Mutant("ckpt-no-checksum", "checkpoint", 'if _sha256(file) != meta["sha256"]:', "if False:", "checkpoint", "a corrupted file passes verification"),
    Mutant("ckpt-no-size-check", "checkpoint", 'if file.stat().st_size != meta["size"]:', "if False:", "checkpoint", "truncation reported as a checksum error only"),
    Mutant("ckpt-missing-file-ok", "checkpoint", "        if not file.is_file():\n            return f\"{name} is missing\"", "        if not file.is_file():\n            continue", "checkpoint", "a missing file passes verification"),
    Mutant("ckpt-no-manifest-ok", "checkpoint", 'return "no manifest.json (an interrupted save?)"', "return None", "checkpoint", "an interrupted save counts as complete"),
    Mutant("ckpt-auto-picks-oldest", "checkpoint", "for candidate in reversed(self.complete()):", "for candidate in self.complete():", "checkpoint", "auto resume takes the oldest checkpoint"),
    Mutant("ckpt-damaged-deleted", "checkpoint", "os.replace(bad, aside)", "shutil.rmtree(bad)", "checkpoint", "damaged checkpoints deleted, not kept aside"),
    Mutant("ckpt-all-damaged-starts-over", "checkpoint", "            if damaged:\n                listed", "            if False:\n                listed", "checkpoint", "all damaged: silently starts from scratch"),
    Mutant("ckpt-never-overwrites", "checkpoint", "            if existing:", "            if False:", "checkpoint", "resume=never trains over checkpoints"),
    Mutant("ckpt-explicit-unverified", "checkpoint", "        problem = verify(path)\n        if problem:", "        problem = None\n        if problem:", "checkpoint", "explicit resume of an incomplete dir accepted"),
    Mutant("ckpt-fork-in-place", "checkpoint", "        if newer:", "        if False:", "checkpoint", "an older checkpoint resumed in place"),
    Mutant("ckpt-newest-counts-as-older", "checkpoint", "p.name > path.name", "p.name >= path.name", "checkpoint", "the newest checkpoint refused in place"),
    Mutant("ckpt-other-batch-accepted", "checkpoint", "if state.global_batch != cfg.train.batch_size:", "if False:", "checkpoint", "resume with another global batch"),
    Mutant("ckpt-other-model-accepted", "checkpoint", "    if mismatched:", "    if False:", "checkpoint", "resume with another model shape"),
    Mutant("ckpt-other-format-accepted", "checkpoint", 'if data.get("format_version") != FORMAT_VERSION:', "if False:", "checkpoint", "a train state of another format read"),
    Mutant("ckpt-pickles-unchecked", "checkpoint", "                _check_no_code_in_pickles(Path(choice))", "                pass", "pickles", "code-carrying pickles loaded"),
    Mutant("ckpt-load-resaves", "checkpoint", "        self.last_saved_step = state.step\n        return state", "        return state", "checkpoint", "a resumed step is saved again"),
    Mutant("ckpt-best-higher-fid", "checkpoint", "fid < best[\"fid\"]", "fid > best[\"fid\"]", "checkpoint", "a worse FID becomes best"),
    Mutant("ckpt-best-nan", "checkpoint", "if not (math.isfinite(fid) and (best is None", "if not ((best is None", "checkpoint", "a NaN FID becomes best"),
    Mutant("ckpt-best-blocked-by-nan-record", "checkpoint", "return record if isinstance(fid, (int, float)) and math.isfinite(fid) else None", "return record if fid is not None else None", "checkpoint", "a NaN best.json blocks later FIDs"),
    Mutant("ckpt-rotation-drops-best", "checkpoint", "if old.name != best:", "if True:", "checkpoint", "rotation deletes the best checkpoint"),
    # ---- data ------------------------------------------------------------------------------------
    Mutant("data-wrong-scale", "data", "images = images.div_(127.5).sub_(1.0)", "images = images.div_(255.0)", "data", "inputs in [0, 1], not [-1, 1]"),
    Mutant("data-partial-batches", "data", "drop_last=True,", "drop_last=False,", "data", "a short last batch"),
    Mutant("data-no-shuffle", "data", "shuffle=True,", "shuffle=False,", "data", "the same order every epoch"),
    Mutant("data-cifar-key-of-test-files", "data", "files = sorted(batches / name for name, _ in cifar.train_list)", "files = sorted(batches / name for name, _ in cifar.test_list)", "data", "cache key ignores the training batches"),
    Mutant("data-bad-files-ignored", "data", 'if policy != "skip":', 'if policy == "never":', "data", "unreadable files never stop a run"),
    Mutant("packed-mtime-ignored", "packed", "{st.st_size}\\0{st.st_mtime_ns}\\n", "{st.st_size}\\n", "data", "a rewritten file of the same size reuses the cache"),
    Mutant("packed-hw-swapped", "packed", "side, chw = native, images_nhwc.transpose(0, 3, 1, 2)", "side, chw = native, images_nhwc.transpose(0, 3, 2, 1)", "data", "CIFAR images transposed"),
    # ---- the loop: logged averages and decisions -------------------------------------------------
    Mutant("meter-no-division", "meter", "/ self.count", "", "meter", "logged losses are window sums"),
    Mutant("meter-no-reset", "meter", "        self.reset()\n        return dict(", "        return dict(", "meter", "windows pile up"),
    Mutant("meter-count-stuck", "meter", "self.count += 1", "self.count = 1", "meter", "divides by 1"),
    Mutant("meter-sum-across-ranks", "meter", 'reduction="mean"', 'reduction="sum"', "meter-2-ranks", "ranks' averages added"),
    Mutant("meter-rank-0-only", "meter", 'values = accelerator.reduce(local, reduction="mean").tolist()', "values = local.tolist()", "meter-2-ranks", "each rank logs its own average"),
    Mutant("loop-resume-not-loaded", "loop", "        state = checkpointer.load(resume_from)\n", "        pass\n", "rerun", "a found checkpoint is not loaded"),
    Mutant("loop-resume-replays-epoch-start", "loop", "accelerator.skip_first_batches(loader, state.step_in_epoch) if state.step_in_epoch else loader", "loader", "sigkill-resume", "a mid-epoch resume replays the epoch's first batches"),
    Mutant("loop-eval-every-steps-ignored", "loop", "or (cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0)", "or False", "eval-every-steps", "eval.every_steps never evaluates"),
]
# fmt: on


def _tree_files(repo: Path) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [f for f in out.split("\0") if f and (repo / f).is_file()]


def copy_tree(repo: Path, dest: Path) -> None:
    for name in _tree_files(repo):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, target)


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONDONTWRITEBYTECODE="1")
    return env


def run_tests(tree: Path, selection: str, timeout: float) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout', seconds, the first failing test)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *SELECTIONS[selection]]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, ""
    seconds = time.perf_counter() - start
    if proc.returncode == 0:
        return "passed", seconds, ""
    failed = [
        line.split(" ", 1)[1].split(" - ")[0]
        for line in proc.stdout.splitlines()
        if line.startswith(("FAILED ", "ERROR "))
    ]
    return "failed", seconds, (failed[0] if failed else f"exit {proc.returncode}")


def check_mutant(tree: Path, mutant: Mutant, timeout: float) -> tuple[str, float, str]:
    path = tree / MODULES[mutant.module]
    original = path.read_text()
    found = original.count(mutant.old)
    if found != 1:
        return "stale", 0.0, f"`old` found {found} times in {MODULES[mutant.module]}"
    path.write_text(original.replace(mutant.old, mutant.new))
    try:
        outcome, seconds, detail = run_tests(tree, mutant.tests, timeout)
    finally:
        path.write_text(original)
    return {"failed": "killed", "timeout": "killed (timeout)", "passed": "SURVIVED"}[outcome], seconds, detail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the mutants whose id contains this text (comma: any of them)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per test run")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy of the tree")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if any(part in m.id for part in args.only.split(","))]
    if args.list:
        for m in mutants:
            found = (REPO / MODULES[m.module]).read_text().count(m.old)
            state = "ok" if found == 1 else f"STALE ({found} matches)"
            print(f"{m.id:36} {MODULES[m.module]:24} {m.tests:18} {state:6} {m.why}")
        return 0

    tree = Path(tempfile.mkdtemp(prefix="mutation-check-"))
    try:
        copy_tree(REPO, tree)
        where = subprocess.run(
            [sys.executable, "-c", "import trainer; print(trainer.__file__)"],
            cwd=tree,
            env=_env(tree),
            capture_output=True,
            text=True,
        ).stdout.strip()
        if not where.startswith(str(tree)):
            print(f"the copy imports trainer from {where}, not from {tree}", file=sys.stderr)
            return 2
        for selection in sorted({m.tests for m in mutants}):  # unmutated, every selection must pass
            outcome, seconds, detail = run_tests(tree, selection, args.timeout)
            print(f"baseline {selection}: {outcome} in {seconds:.0f}s {detail}".rstrip(), flush=True)
            if outcome != "passed":
                return 2

        print("\n| mutant | module | bug | tests | result | s | first failing test |")
        print("|---|---|---|---|---|---|---|")
        survivors = 0
        for m in mutants:
            result, seconds, detail = check_mutant(tree, m, args.timeout)
            survivors += not result.startswith("killed")
            print(
                f"| {m.id} | {MODULES[m.module]} | {m.why} | {m.tests} | {result} | {seconds:.0f} | {detail} |",
                flush=True,
            )
        killed = len(mutants) - survivors
        print(f"\n{killed} of {len(mutants)} mutants killed, {survivors} survived or stale")
        return 1 if survivors else 0
    finally:
        if args.keep:
            print(f"copy kept at {tree}")
        else:
            shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
