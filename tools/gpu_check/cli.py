"""`python -m tools.gpu_check --out DIR [--data PATH] [--bundle DIR] [--device cuda|cpu] [--tiny] [--budget-s 525] [--only A,B]`

Checking a GPU machine: runs every check (`--list` shows them) in order, each in its own process tree
under its own cap, inside the total budget, and writes DIR/report.md (the headline answers first),
DIR/report.json, DIR/logs.tar.gz and the files the checks return (the full run's last grid, real
grid, samples and generator): at most --max-files files of at most --max-file-mib each, flat, so the
folder can come back from a machine that returns only a few files. Exit code 0 when no check failed
or timed out (skipped checks say why in the report), 1 otherwise, 2 for a bad command line.

A node without internet gets what it lacks from a bundle (tools/bundle_offline.sh writes .bundle/:
wheels, the CIFAR-10 tarball, the classifier weights, the commit); `--bundle` defaults to .bundle/
in the checkout, and --data and --classifier default to what it holds. The work folder (default: a
fixed folder under the system's temporary directory) keeps the unpacked and packed data, the
compile cache and finished quality runs, so a rerun with the same --work skips that work.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from tools.gpu_check.checks import REPO, registry
from tools.gpu_check.report import write_report
from tools.gpu_check.runner import WORK_ENV, Check, Result, run_checks

# One command of at most ~9 minutes: within a 560 s limit, with time for the install line and the report.
DEFAULT_BUDGET_S = 525.0
DEFAULT_WORK = Path(tempfile.gettempdir()) / "dcgan-gpu-check"
DEFAULT_BUNDLE = REPO / ".bundle"
OUTPUTS = (
    "report.md",
    "report.json",
    "logs.tar.gz",
    "grid_full_run.png",
    "real.png",
    "samples.npz",
    "generator.safetensors",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.gpu_check",
        description="Check a GPU machine: the trainer's CUDA paths, throughput against the classic DCGAN loop, "
        "sample quality at 64x64 and a full 25-epoch run, in one command within a time budget.",
        epilog="examples: python -m tools.gpu_check --out gpu-report | "
        "python -m tools.gpu_check --device cpu --tiny --out /tmp/gpu-check-tiny | "
        "python -m tools.gpu_check --out gpu-report-2 --only compile_reduce_overhead,full_run",
    )
    parser.add_argument("--out", type=Path, help="report folder (report.md, report.json, logs.tar.gz, grids, samples)")
    parser.add_argument(
        "--bundle", type=Path, help="offline bundle (tools/bundle_offline.sh); default: .bundle/ if present"
    )
    parser.add_argument(
        "--data", help="cifar10-jpg.tar.gz or the folder holding train/ and test/; default: the bundle's"
    )
    parser.add_argument(
        "--classifier", help="cifar10-classifier weights for the quality verdict; default: the bundle's"
    )
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: cuda if present")
    parser.add_argument("--tiny", action="store_true", help="every check at toy size (tiny nets, few steps)")
    parser.add_argument(
        "--budget-s", type=float, default=DEFAULT_BUDGET_S, help=f"total time budget (default {DEFAULT_BUDGET_S:.0f})"
    )
    parser.add_argument("--only", help="comma-separated checks to run (the ones they need are added)")
    parser.add_argument("--skip", help="comma-separated checks not to run")
    parser.add_argument(
        "--work", type=Path, default=DEFAULT_WORK, help=f"work folder, reused by reruns (default {DEFAULT_WORK})"
    )
    parser.add_argument("--max-file-mib", type=float, default=16.0, help="per-file limit in --out (default 16)")
    parser.add_argument("--max-files", type=int, default=8, help="files in --out, the report's included (default 8)")
    parser.add_argument("--list", action="store_true", help="list the checks and their caps, then exit")
    # Hidden: add a check `module:function[:cap_s]` after the others (tests inject failing or hanging ones).
    parser.add_argument("--extra-check", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.list and args.out is None:
        parser.error("--out DIR is required")
    if args.bundle is None and DEFAULT_BUNDLE.is_dir():
        args.bundle = DEFAULT_BUNDLE
    if args.bundle is not None:
        if not args.bundle.is_dir():
            parser.error(f"--bundle {args.bundle}: not a folder (tools/bundle_offline.sh makes one)")
        args.bundle = args.bundle.resolve()
        tarball, weights = args.bundle / "cifar10-jpg.tar.gz", args.bundle / "classifier.safetensors"
        if args.data is None and tarball.is_file() and not args.tiny:
            args.data = str(tarball)
        if args.classifier is None and weights.is_file():
            args.classifier = str(weights)
    if args.classifier is None:  # the weights `python -m tools.classifier train` caches, if any
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dcgan-trainer" / "classifier"
        cached = sorted(cache.glob("cifar10-classifier-*.safetensors"), key=os.path.getmtime)
        args.classifier = str(cached[-1]) if cached else None
    # The checks run with the repository as their folder: paths given relative to here must stay valid.
    for name in ("data", "classifier"):
        if getattr(args, name) is not None:
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    return args


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def extra_check(spec: str) -> Check:
    """`module:function[:cap_s]` as a Check named after the function (no cap: the rest of the budget)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise SystemExit(f"error: --extra-check {spec!r}: expected module:function[:cap_s]")
    cap = float(parts[2]) if len(parts) == 3 else None
    return Check(parts[1], f"{parts[0]}:{parts[1]}", cap, about=f"extra check {spec}")


def select(checks: list[Check], only: list[str], skip: list[str]) -> tuple[list[Check], dict[str, str]]:
    """(checks to run, in order; why each other one does not run). `only` brings what it needs along."""
    known = {c.name: c for c in checks}
    unknown = [n for n in only + skip if n not in known]
    if unknown:
        raise SystemExit(f"error: unknown check(s) {', '.join(unknown)}; known: {', '.join(known)}")
    left_out: dict[str, str] = {}
    if only:
        wanted, todo = set(), list(only)
        while todo:
            name = todo.pop()
            if name not in wanted:
                wanted.add(name)
                todo.extend(known[name].needs)
        left_out.update({c.name: "not selected (--only)" for c in checks if c.name not in wanted})
    left_out.update({name: "left out on request (--skip)" for name in skip})
    return [c for c in checks if c.name not in left_out], left_out


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch  # only to decide; the checks run in their own processes

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_environment(device: str, tiny: bool, shared: Path) -> dict[str, str]:
    """The environment every check and command runs with."""
    env = dict(os.environ)
    env[WORK_ENV] = str(shared.parent)  # how the runner finds everything this run started (runner.sweep)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("ACCELERATE_MIXED_PRECISION", None)  # the trainer's config decides the precision
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run stays on the CPU even where a GPU exists
    if "TORCHINDUCTOR_CACHE_DIR" not in env:
        # --tiny keeps compiled kernels between runs (a second CPU run compiles twice as fast); a GPU run keeps
        # them in the work folder: compile_reduce_overhead reuses compile_default's, and a rerun both.
        cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dcgan-trainer" / "gpu-check-inductor"
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache if tiny else shared / "inductor")
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bundle = str(args.bundle) if args.bundle else None
    checks = registry(args.tiny, args.data, bundle, args.classifier) + [extra_check(s) for s in args.extra_check]
    if args.list:
        for c in checks:
            cap = "rest of the budget" if c.cap_s is None else f"cap {c.cap_s:.0f}s"
            print(f"{c.name:26} {cap:20} reserve {c.reserve_s:4.0f}s  {c.about}")
        return 0
    chosen, left_out = select(checks, _names(args.only), _names(args.skip))
    not_run = {
        c.name: Result(c.name, "skipped", {}, left_out[c.name], 0.0, None, c.about)
        for c in checks
        if c.name in left_out
    }

    def every_check(results: list[Result]) -> list[Result]:
        """One entry per check, in registry order: the ones not run say why."""
        ran = {r.name: r for r in results}
        return [ran[c.name] if c.name in ran else not_run[c.name] for c in checks if c.name in ran or c.name in not_run]

    device = resolve_device(args.device)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # a previous report in the same folder must not pass for this one
        (out / name).unlink(missing_ok=True)
    root = args.work.resolve()
    (root / "shared").mkdir(parents=True, exist_ok=True)
    limit = int(args.max_file_mib * 2**20)
    base = {
        "device": device,
        "tiny": args.tiny,
        "repo": str(REPO),
        "shared": str(root / "shared"),
        "out": str(out),
        "max_file_bytes": limit,
        "max_files": args.max_files,
        "env": check_environment(device, args.tiny, root / "shared"),
    }
    meta = {
        "command": shlex.join([Path(sys.executable).name, "-m", "tools.gpu_check", *(argv or sys.argv[1:])]),
        "device": device,
        "tiny": args.tiny,
        "budget_s": args.budget_s,
        "host": platform.node(),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "work": str(root),
        "bundle": bundle,
        "data": args.data,
        "classifier": args.classifier,
        "wall_s": 0.0,
    }
    start = time.monotonic()
    print(
        f"gpu check: {len(chosen)} of {len(checks)} checks on {device}{' (tiny)' if args.tiny else ''}, budget {args.budget_s:.0f}s, "
        f"work {root}, report {out}",
        flush=True,
    )

    def on_result(result: Result, results: list[Result]) -> None:
        meta["wall_s"] = round(time.monotonic() - start, 1)
        first_error = (result.error or "").strip().splitlines()
        print(
            f"[{meta['wall_s']:5.0f}s] {result.name:24} {result.status:8} {result.wall_s:6.1f}s"
            + (f" | {first_error[0][:160]}" if first_error else ""),
            flush=True,
        )
        write_report(out, meta, every_check(results), root / "logs", limit)

    results = run_checks(chosen, args.budget_s, root, base, base["env"], on_result)
    meta["wall_s"] = round(time.monotonic() - start, 1)
    write_report(out, meta, every_check(results), root / "logs", limit)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    print(f"gpu check: {meta['wall_s']:.0f}s; report {out / 'report.md'}; files: {', '.join(files)}", flush=True)
    return 1 if any(r.status in ("failed", "timeout") for r in results) else 0
