"""The checks. Each drives the trainer through its command lines and reads what it wrote.

Every check is `fn(ctx, **params)` (see runner.Context): it runs commands with `ctx.run`, records
figures with `ctx.record` as soon as it has them, names the training runs that speak for it if it is
killed (`ctx.watch`), and raises Skip / CheckFailed / Timeout to say how it ended. `registry()` lists
them in the order they run, with their caps: one set of sizes for a GPU, one for `--tiny`.

What the trainer is asked through (re-point here if they move): `python -m trainer.train`,
`python -m trainer.prepare`, `python -m trainer.bench`, `python -m trainer.sample`,
`tools/compare_quality.py`, `accelerate launch` and `torchrun`, the run folder's metrics.jsonl
(training lines with `diversity`) / samples/*.png / generator.safetensors / STOP file, and the one
start-up line of the loop ("N images, S steps/epoch ... device D, precision P, BatchNorm").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from tools.gpu_check.fp16_overflow import FORCED_INIT_SCALE
from tools.gpu_check.runner import Check, CheckFailed, Completed, Context, Skip, Timeout, run_figures, tail
from tools.gpu_check.with_process_group import MARK

REPO = Path(__file__).resolve().parents[2]
WITH_GROUP = REPO / "tools" / "gpu_check" / "with_process_group.py"
COMPARE_QUALITY = REPO / "tools" / "compare_quality.py"
CLASSIC_CONFIG = "configs/dcgan_cifar10.yaml"  # 64x64, global batch 64, 25 epochs, precision auto
TINY_CONFIG = "configs/smoke.yaml"  # 32x32, nz 16, ngf/ndf 8, global batch 16
CLASSIC_BATCH, TINY_BATCH = 64, 16
TINY_TRAIN_IMAGES, TINY_TEST_IMAGES = 96, 32
NEVER = "1000000"  # a step interval no check reaches: no mid-run checkpoints or grids inside a timing window
COMMAND_TIMEOUT_S = 10  # for optional tools (git, nvidia-smi): a hung one must not hold the check
# The trainer cannot start without these (pyproject.toml); the rest only serves evaluation and W&B.
REQUIRED = ("torch", "torchvision", "accelerate", "omegaconf", "safetensors", "numpy", "PIL", "rich")
OPTIONAL = ("torch_fidelity", "wandb", "psutil")

STARTUP = re.compile(
    r"(?P<images>\d+) images, (?P<steps_per_epoch>\d+) steps/epoch of (?P<global_batch>\d+) images "
    r"\((?P<per_process>\d+) per process x (?P<processes>\d+)\), (?P<total_steps>\d+) steps in all; "
    r"device (?P<device>\S+), precision (?P<precision>\S+), (?P<norm>SyncBatchNorm|BatchNorm)"
)
GROUP_LINE = re.compile(
    re.escape(MARK) + r" rank (?P<rank>\d+)/(?P<world>\d+) backend (?P<backend>\S+) device (?P<device>\S+) "
    r"collectives (?P<collectives>\S+) bypass_device_map (?P<bypass_device_map>\S+)"
)
CUDAGRAPH_SKIP = re.compile(r"skipping cudagraphs due to (?P<reason>.*)")
GRAPH_BREAK = re.compile(r"Graph break", re.IGNORECASE)


# ---- commands -----------------------------------------------------------------------------------


def batch_size(ctx: Context) -> int:
    return TINY_BATCH if ctx.tiny else CLASSIC_BATCH


def data_root(ctx: Context) -> Path:
    """The folder holding train/ and test/: a link the data check points at the real one."""
    return Path(ctx.shared) / "data"


def trainer_args(ctx: Context, run_dir: Path, *overrides: str) -> list[str]:
    """Config and overrides shared by every check: the classic recipe (or the smoke nets with --tiny) on
    the JPEG folder, packed once into a cache all checks share, no tracker, no FID (its InceptionV3
    weights cannot be fetched on a machine without internet), a fresh run folder."""
    return [
        "--config",
        TINY_CONFIG if ctx.tiny else CLASSIC_CONFIG,
        "data.source=folder",
        f"data.root={data_root(ctx) / 'train'}",
        "data.download=false",
        f"data.cache_dir={Path(ctx.shared) / 'packed'}",
        f"run.dir={run_dir}",
        "run.resume=never",
        "log.tracker=none",
        "eval.every_epochs=null",
        "eval.every_steps=null",
        *overrides,
    ]


def short_run(ctx: Context, run_dir: Path, steps: int, log_every: int, *overrides: str) -> list[str]:
    """`trainer_args` for a run of `steps` steps that only logs (no grids or checkpoints inside it)."""
    return trainer_args(
        ctx,
        run_dir,
        f"train.max_steps={steps}",
        f"log.every_steps={log_every}",
        f"log.sample_every_steps={NEVER}",
        f"ckpt.every_steps={NEVER}",
        *overrides,
    )


def train_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "trainer.train", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(script: Path, args: list[str], processes: int) -> list[str]:
    """`accelerate launch --multi_gpu`: on a CPU-only machine this is what starts gloo ranks (MULTI_CPU)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",  # the trainer's train.mixed_precision decides; this only quiets the launcher
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(script),
        *args,
    ]


def torchrun_command(script: Path, args: list[str], processes: int) -> list[str]:
    """torchrun on this machine (`accelerate launch --multi_gpu` refuses fewer than two processes)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(free_port()),
        str(script),
        *args,
    ]


# ---- reading what a run wrote -------------------------------------------------------------------


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The training lines of metrics.jsonl (evaluation lines have no images_per_s)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "images_per_s" in r and "loss_D" in r]


def startup_figures(output: str) -> dict[str, Any]:
    """The loop's start-up line: data size, steps, device, precision, BatchNorm kind."""
    found = STARTUP.search(output)
    if not found:
        return {}
    values = found.groupdict()
    return {k: int(v) if v.isdigit() else v for k, v in values.items()}


def group_ranks(output: str) -> list[dict[str, Any]]:
    """The `[gpu check]` lines of with_process_group.py, one per rank."""
    return [{k: int(v) if v.isdigit() else v for k, v in m.groupdict().items()} for m in GROUP_LINE.finditer(output)]


def training_figures(records: list[dict[str, Any]], global_batch: int) -> dict[str, Any]:
    """Steady-state speed and health of a run from its metrics.jsonl lines.

    images/s is the median over log windows after the first: the first pays for start-up work
    (allocation, cuDNN autotuning, compilation) that a long run amortises.
    """
    if not records:
        raise CheckFailed("the run logged no training metrics (metrics.jsonl is missing or empty)")
    speeds = [float(r["images_per_s"]) for r in records]
    steady = statistics.median(speeds[1:] or speeds)
    nonfinite = [
        r["step"] for r in records if not (math.isfinite(float(r["loss_D"])) and math.isfinite(float(r["loss_G"])))
    ]
    peaks = [float(r["gpu_mem_peak_GiB"]) for r in records if "gpu_mem_peak_GiB" in r]
    last = records[-1]
    figures: dict[str, Any] = {
        "steps": int(last["step"]),
        "log_windows": len(records),
        "images_per_s": round(steady, 1),
        "ms_per_step": round(1000 * global_batch / steady, 3),
        "first_window_images_per_s": round(speeds[0], 1),
        "loss_D_final": float(last["loss_D"]),
        "loss_G_final": float(last["loss_G"]),
        "losses_finite": not nonfinite,
        "gpu_mem_peak_GiB": round(max(peaks), 3) if peaks else None,
    }
    if "diversity" in last:
        figures["diversity"] = round(float(last["diversity"]), 4)
    if nonfinite:
        figures["first_nonfinite_step"] = nonfinite[0]
    for key in ("loss_scale", "skipped_steps_D", "skipped_steps_G"):
        if key in last:
            figures[key] = last[key]
    return figures


def window_seconds(records: list[dict[str, Any]], global_batch: int) -> float:
    """Training time covered by the log windows (each window: its steps x batch / its images/s)."""
    total, previous = 0.0, 0
    for r in records:
        total += (r["step"] - previous) * global_batch / max(float(r["images_per_s"]), 1e-9)
        previous = r["step"]
    return total


def last_grid(run_dir: Path) -> Path | None:
    grids = [p for p in (run_dir / "samples").glob("*.png") if p.name != "real.png"]
    return max(grids, key=lambda p: (p.stat().st_mtime_ns, p.name)) if grids else None


def keep_run(ctx: Context, run_dir: Path, prefix: str = "") -> None:
    """metrics.jsonl and the newest grid into the check's logs (they travel in logs.tar.gz)."""
    ctx.keep(run_dir / "metrics.jsonl", f"{prefix}metrics.jsonl")
    grid = last_grid(run_dir)
    if grid is not None:
        ctx.keep(grid, f"{prefix}grid_{grid.name}")


def refused_on_cpu(ctx: Context, done: Completed) -> None:
    """A configuration the CPU cannot run (fp16): the command still ran up to the trainer's hardware
    check, so the command line and the config are exercised; report the refusal as the skip reason."""
    if ctx.device == "cpu" and done.returncode == 2:
        errors = [line for line in done.output.splitlines() if line.startswith("error:")]
        raise Skip(f"needs CUDA; on CPU the trainer refused it as designed: {errors[-1] if errors else 'exit 2'}")


def require_success(done: Completed, what: str) -> None:
    if done.returncode != 0:
        raise CheckFailed(f"{what} exited with code {done.returncode}; last output:\n{tail(done.output)}")


def require_finite(figures: dict[str, Any]) -> None:
    if not figures["losses_finite"]:
        raise CheckFailed(f"losses stopped being finite at step {figures.get('first_nonfinite_step')}")


def judge_diversity(ctx: Context, diversity: float | None, what: str) -> None:
    """Fail on collapsed samples: `diversity` (relative to real images, trainer/monitor/diversity.py) below
    the collapse threshold. At toy size the generator has not left its uniform start: recorded, not judged."""
    from trainer.monitor.diversity import COLLAPSE_BELOW

    ctx.record(diversity_threshold=COLLAPSE_BELOW, diversity_judged=not ctx.tiny)
    if diversity is None:
        raise CheckFailed(f"{what}: no diversity figure to judge the samples by")
    if not ctx.tiny and diversity < COLLAPSE_BELOW:
        raise CheckFailed(
            f"{what}: the samples have collapsed: diversity {diversity:.3f} of real images' (below {COLLAPSE_BELOW}); "
            "every latent gives nearly the same image"
        )


def trained_run(ctx: Context, run_dir: Path, done: Completed, steps: int) -> dict[str, Any]:
    """The figures of a finished short run, judged: it succeeded, ran `steps` steps, stayed finite and diverse."""
    require_success(done, "training")
    figures = training_figures(read_records(run_dir), batch_size(ctx))
    ctx.record(**figures)
    keep_run(ctx, run_dir)
    require_finite(figures)
    if figures["steps"] != steps:
        raise CheckFailed(f"the run ended at step {figures['steps']}, not {steps}")
    judge_diversity(ctx, figures.get("diversity"), "the fixed-noise grid at the last log step")
    return figures


# ---- the checks ---------------------------------------------------------------------------------


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def optional_output(command: list[str], cwd: str | None = None) -> str | None:
    """The first lines of an optional tool's output, or why there is none: a missing, failing or hung
    tool (git on a copy of the tree, nvidia-smi on a container) is reported, never fatal."""
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"({command[0]} did not answer within {COMMAND_TIMEOUT_S}s)"
    except OSError as exc:
        return f"({command[0]}: {exc})"
    if done.returncode != 0:
        return f"({command[0]} exited {done.returncode}: {(done.stderr or done.stdout).strip()[:200]})"
    return done.stdout.strip()[:1000]


def source_digest(repo: Path) -> str:
    """A hash of the code and configs the checks run: names the code on a copy of the tree without git,
    and keys work a rerun may reuse (the quality runs)."""
    digest = hashlib.sha256()
    for folder in ("trainer", "tools", "configs"):
        for path in sorted((repo / folder).rglob("*")):
            if path.suffix in (".py", ".yaml", ".sh") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def nccl_version() -> str | None:
    try:
        import torch.cuda.nccl

        version = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001  (no NCCL in this build, or an older API: a figure, not a failure)
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def environment(ctx: Context, bundle: str | None = None) -> None:
    """Versions, the device, the code: the context every figure below needs. Fails only on what the trainer
    needs (its packages; CUDA with --device cuda); git and nvidia-smi are optional."""
    import importlib

    figures: dict[str, Any] = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "source_digest": source_digest(Path(ctx.repo)),
    }
    import trainer  # noqa: F401  (installs the trainer's torchvision import shim, as every entry point does)

    missing = []
    for name in REQUIRED + OPTIONAL:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001  (not only ImportError: a broken install raises anything)
            figures[name] = None
            if name in REQUIRED:
                missing.append(f"{name} ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        figures[name] = getattr(module, "__version__", None) or _version(name)
    ctx.record(**figures)
    commit = optional_output(["git", "rev-parse", "HEAD"], cwd=ctx.repo)
    if commit and not commit.startswith("("):
        changes = optional_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ctx.repo) or ""
        ctx.record(commit=commit, commit_from="git", local_changes=changes.splitlines())
    elif bundle and (Path(bundle) / "commit.txt").is_file():  # a copy without .git: the bundle says what it is
        lines = (Path(bundle) / "commit.txt").read_text().splitlines()
        ctx.record(commit=lines[0] if lines else None, commit_from="bundle commit.txt", local_changes=lines[1:])
    else:
        ctx.record(commit=None, commit_from=commit or "no git and no bundle commit.txt: see source_digest")
    ctx.record(
        nvidia_smi=optional_output(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        )
    )
    if missing:
        raise CheckFailed(
            f"the trainer needs {', '.join(missing)}, which cannot be imported here; install them "
            "(offline: pip install --no-index --find-links <bundle>/wheels ..., see docs/gpu.md)"
        )
    import torch

    cuda = torch.cuda.is_available()
    ctx.record(
        torch_cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        cuda_available=cuda,
        # What fp32 means for the trainer, which leaves torch's defaults alone: TF32 convolutions on Ampere+.
        tf32_convolutions=torch.backends.cudnn.allow_tf32,
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
    )
    if cuda:
        props = torch.cuda.get_device_properties(0)
        ctx.record(
            device_name=props.name,
            device_count=torch.cuda.device_count(),
            capability=f"{props.major}.{props.minor}",
            device_memory_GiB=round(props.total_memory / 2**30, 1),
            bf16_supported=torch.cuda.is_bf16_supported(),
            nccl=nccl_version(),
        )
    if ctx.device == "cuda" and not cuda:
        raise CheckFailed("--device cuda, but torch.cuda.is_available() is False here")


def write_tiny_tree(root: Path) -> None:
    """CIFAR-10's layout at toy size: train/<class>/NNNN.jpg and test/<class>/NNNN.jpg, 32x32 JPEGs of
    smooth colour blobs (something a GAN can learn in a few steps)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", TINY_TRAIN_IMAGES), ("test", TINY_TEST_IMAGES)):
        for i in range(count):
            folder = root / split / ("cats", "ships")[i % 2]
            folder.mkdir(parents=True, exist_ok=True)
            coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
            coarse.resize((32, 32), Image.BILINEAR).save(folder / f"{i:04d}.jpg", quality=90)


def _count_images(folder: Path) -> int:
    suffixes = {".jpg", ".jpeg", ".png"}
    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in suffixes) if folder.is_dir() else 0


def _unpack(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    if shutil.which("tar"):  # GNU tar: 5x quicker than tarfile on CIFAR-10's 60k small files
        subprocess.run(["tar", "-xzf", str(src), "-C", str(dest)], check=True, capture_output=True)
    else:
        with tarfile.open(src) as archive:
            # filter="data" refuses links and paths outside the folder (Python 3.12; 3.11.4+)
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(dest, **extra)


def data(ctx: Context, source: str | None) -> None:
    """The data every check trains on: the CIFAR-10 JPEG tarball unpacked (or a folder, or a toy tree),
    then packed once by `python -m trainer.prepare` into the cache every check shares. A rerun with the
    same work folder and source reuses both."""
    link = data_root(ctx)
    unpacked = Path(ctx.shared) / "data-files"
    stamp = Path(ctx.shared) / "data-source.json"
    start = time.monotonic()
    if source is None and not ctx.tiny:
        raise CheckFailed(
            "no data: pass --data PATH, the CIFAR-10 JPEG tarball (cifar10-jpg.tar.gz) or the folder holding "
            "train/, or bundle it (tools/bundle_offline.sh)"
        )
    src = Path(source).resolve() if source else None
    identity = {"source": str(src) if src else "generated", "tiny": ctx.tiny}
    if src is not None and src.is_file():
        identity.update(size=src.stat().st_size, mtime_ns=src.stat().st_mtime_ns)
    reused = stamp.is_file() and json.loads(stamp.read_text()) == identity and link.exists()
    if not reused:
        stamp.unlink(missing_ok=True)
        for path in (link, unpacked):
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.exists():
                shutil.rmtree(path)
        if src is None:
            write_tiny_tree(unpacked)
            kind, base = "generated toy tree", unpacked
        elif src.is_dir():
            kind, base = "folder", src
        elif src.is_file() and tarfile.is_tarfile(src):
            _unpack(src, unpacked)
            kind, base = "tarball", unpacked
        else:
            raise CheckFailed(f"--data {source}: neither a folder nor a tar archive")
        # The tarball holds train/ at its top; accept one folder level above it too (cifar10-jpg/train).
        holders = [base, *sorted(p for p in base.iterdir() if p.is_dir())]
        holder = next((p for p in holders if (p / "train").is_dir()), None)
        if holder is None:
            raise CheckFailed(f"no train/ folder in {source or base} (expected train/<class>/*.jpg)")
        link.symlink_to(holder, target_is_directory=True)
        ctx.record(kind=kind)
    holder = link.resolve()
    train_images = _count_images(holder / "train")
    ctx.record(
        source=source or "generated",
        reused_from_earlier_run=reused,
        unpack_s=round(time.monotonic() - start, 2),
        train_images=train_images,
        test_images=_count_images(holder / "test"),
        classes=sorted(p.name for p in (holder / "train").iterdir() if p.is_dir()),
    )
    needed = 2 * TINY_BATCH if ctx.tiny else 512  # the largest global batch of the checks
    if train_images < needed:
        raise CheckFailed(f"only {train_images} training images under {holder / 'train'}; the checks need {needed}+")
    if not ctx.tiny and train_images != 50000:
        ctx.record(note=f"{train_images} training images, not CIFAR-10's 50000: figures are not the classic recipe's")
    # Pack once, timed, so that no timed check pays for it (the cache is keyed: a rerun finds it).
    done = ctx.run([sys.executable, "-m", "trainer.prepare", *trainer_args(ctx, Path(ctx.work) / "unused")], "prepare")
    ctx.record(prepare_s=round(done.wall_s, 1))
    stamp.write_text(json.dumps(identity))


def bench(ctx: Context, batch: int, steps: int, warmup: int, reference: bool = True) -> None:
    """`python -m trainer.bench` at one global batch: ours (the trainer's GAN step and data path, without
    the loop's logging and health checks) against the classic loop, on the same data."""
    out = Path(ctx.work) / "bench.json"
    args = trainer_args(ctx, Path(ctx.work) / "unused-run", f"train.batch_size={batch}")
    cmd = [sys.executable, "-m", "trainer.bench", *args, "--steps", str(steps), "--warmup", str(warmup)]
    done = ctx.run([*cmd, "--json", str(out), *([] if reference else ["--no-reference"])], "bench")
    ctx.record(
        wall_s=round(done.wall_s, 1), global_batch=batch, measured_steps=steps, warmup_steps=warmup, reference=reference
    )
    by_name, figures = bench_figures(json.loads(out.read_text()))
    ctx.record(**figures)
    ctx.keep(out)
    if not all(r["images_per_s"] > 0 for r in by_name.values()):
        raise CheckFailed(f"a loop measured no throughput: {by_name}")


def bench_figures(report: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(results by name, flat figures) from trainer.bench's --json output."""
    figures: dict[str, Any] = {"bf16_matmul_tflops": report.get("bf16_matmul_tflops")}
    by_name = {r["name"]: r for r in report["results"]}
    for name, r in by_name.items():
        figures.update(
            {
                f"{name}_images_per_s": round(r["images_per_s"], 1),
                f"{name}_ms_per_step": round(r["ms_per_step"], 3),
                f"{name}_peak_memory_mb": round(r["peak_memory_mb"], 1),
            }
        )
        for key in ("precision", "cudnn_benchmark", "tf32_convolutions"):
            if key in r:
                figures[f"{name}_{key}"] = r[key]
        if r.get("flops_per_step") and figures["bf16_matmul_tflops"]:
            achieved = r["flops_per_step"] / (r["ms_per_step"] / 1000) / 1e12
            figures[f"{name}_tflops"] = round(achieved, 2)
            figures[f"{name}_fraction_of_bf16_matmul"] = round(achieved / figures["bf16_matmul_tflops"], 4)
    figures["memory_kind"] = next(iter(by_name.values()))["memory_kind"] if by_name else None
    if "ours" in by_name and "reference" in by_name:
        ratio = by_name["ours"]["images_per_s"] / by_name["reference"]["images_per_s"]
        figures["speedup_vs_reference"] = round(ratio, 3)
    return by_name, figures


def precision(ctx: Context, precision: str, steps: int, log_every: int) -> None:
    """The classic config for `steps` steps in one precision: finite losses, diverse samples, speed, peak memory."""
    run_dir = Path(ctx.work) / "run"
    ctx.watch(run_dir)
    done = ctx.run(
        train_command(short_run(ctx, run_dir, steps, log_every, f"train.mixed_precision={precision}")),
        "train",
        check=False,
    )
    ctx.record(wall_s=round(done.wall_s, 1), **startup_figures(done.output))
    refused_on_cpu(ctx, done)
    trained_run(ctx, run_dir, done, steps)


def fp16_overflow(ctx: Context, steps: int, init_scale: float = FORCED_INIT_SCALE) -> None:
    """fp16 with the grad scaler started at `init_scale` (tools/gpu_check/fp16_overflow.py): the step's
    skip counters must be non-zero and add up to the scale's halvings."""
    out = Path(ctx.work) / "fp16_overflow.json"
    args = trainer_args(ctx, Path(ctx.work) / "unused-run")
    cmd = [sys.executable, "-m", "tools.gpu_check.fp16_overflow", *args, "--steps", str(steps)]
    done = ctx.run([*cmd, "--init-scale", repr(init_scale), "--json", str(out)], "fp16-overflow", check=False)
    ctx.record(wall_s=round(done.wall_s, 1), init_scale=init_scale)
    refused_on_cpu(ctx, done)
    require_success(done, "the fp16 overflow run")
    figures = json.loads(out.read_text())
    ctx.record(**figures)
    verdict, problem = judge_overflow(
        init_scale, float(figures["final_loss_scale"]), figures["skipped_steps_D"], figures["skipped_steps_G"]
    )
    ctx.record(**verdict, growth_possible=2 * steps >= 2000)
    if problem:
        raise CheckFailed(problem)


def judge_overflow(init_scale: float, final_scale: float, skipped_d: int, skipped_g: int) -> tuple[dict, str | None]:
    """(figures, what is wrong or None): the skip counters must be non-zero and equal the halvings."""
    halvings = math.log2(init_scale / final_scale)
    total = skipped_d + skipped_g
    figures = {"final_loss_scale": final_scale, "scale_halvings": round(halvings, 3), "skipped_total": total}
    change = f"{init_scale:g} -> {final_scale:g}"
    if halvings < 1:
        return figures, f"the loss scale never fell ({change}): no overflow was forced"
    if total == 0:
        return figures, (
            f"the loss scale halved {halvings:g} times ({change}), so {halvings:g} optimizer steps were skipped, "
            "but skipped_steps_D and skipped_steps_G are both 0: the skips were not counted"
        )
    if total != round(halvings) or halvings != round(halvings):
        return figures, (
            f"skipped_steps_D {skipped_d} + skipped_steps_G {skipped_g} = {total}, but the loss scale halved "
            f"{halvings:g} times ({change})"
        )
    return figures, None


def one_rank_nccl(ctx: Context, steps: int, log_every: int) -> None:
    """One rank under torchrun with an NCCL process group: the collectives, DDP with device_ids=[0],
    SyncBatchNorm (train.sync_bn=true), a few steps of the trainer. On a CPU: the same launch with gloo
    and no SyncBatchNorm (which needs CUDA), then skipped, since NCCL itself needs CUDA."""
    on_cuda = ctx.device == "cuda"
    backend = "nccl" if on_cuda else "gloo"
    run_dir = Path(ctx.work) / "run"
    ctx.watch(run_dir)
    args = short_run(ctx, run_dir, steps, log_every, f"train.sync_bn={'true' if on_cuda else 'auto'}")
    command = torchrun_command(WITH_GROUP, ["--backend", backend, "--", *args], 1)
    done = ctx.run(command, "torchrun", check=False)
    ranks = group_ranks(done.output)
    startup = startup_figures(done.output)
    ctx.record(wall_s=round(done.wall_s, 1), ranks=ranks, backend_requested=backend, **startup)
    trained_run(ctx, run_dir, done, steps)
    if [(r["world"], r["backend"], r["collectives"]) for r in ranks] != [(1, backend, "ok")]:
        raise CheckFailed(f"expected one rank of a {backend} group whose collectives work; saw {ranks}")
    if startup.get("processes") != 1:
        raise CheckFailed(f"the loop did not report 1 process: {startup}")
    if on_cuda and startup.get("norm") != "SyncBatchNorm":
        raise CheckFailed(f"train.sync_bn=true on CUDA should give SyncBatchNorm; the loop used {startup.get('norm')}")
    if not on_cuda:
        raise Skip("NCCL needs CUDA; on the CPU the same one-rank torchrun launch ran with gloo and passed")


def two_processes_gloo(ctx: Context, steps: int, log_every: int) -> None:
    """Two ranks on one device through `accelerate launch`, in a gloo process group: NCCL refuses two ranks
    on one GPU; gloo moves CUDA tensors through host memory, so DDP and SyncBatchNorm still run with two
    ranks. On a CPU-only machine this is the usual gloo (MULTI_CPU) launch."""
    run_dir = Path(ctx.work) / "run"
    ctx.watch(run_dir)
    args = short_run(ctx, run_dir, steps, log_every)
    env = {"OMP_NUM_THREADS": "1"}  # two ranks share the cores
    done = ctx.run(launch_command(WITH_GROUP, ["--backend", "gloo", "--", *args], 2), "launch", env=env, check=False)
    ranks = sorted(group_ranks(done.output), key=lambda r: r["rank"])
    startup = startup_figures(done.output)
    ctx.record(wall_s=round(done.wall_s, 1), ranks=ranks, backend_requested="gloo", **startup)
    trained_run(ctx, run_dir, done, steps)
    if len(ranks) != 2 or {(r["world"], r["backend"], r["collectives"]) for r in ranks} != {(2, "gloo", "ok")}:
        raise CheckFailed(f"expected 2 ranks of a gloo group whose collectives work; saw {ranks}")
    if startup.get("processes") != 2:
        raise CheckFailed(f"the loop did not report 2 processes: {startup}")
    if ctx.device == "cuda" and startup.get("norm") != "SyncBatchNorm":
        raise CheckFailed(f"a multi-process CUDA run should use SyncBatchNorm (train.sync_bn=auto); it used {startup}")


def cudagraph_verdict(log: str, counters: dict[str, dict[str, int]]) -> tuple[dict[str, Any], str | None]:
    """(figures, what is wrong or None) of a reduce-overhead run: inductor must not have skipped CUDA graphs.

    Reads both what inductor logs with TORCH_LOGS=cudagraphs ("skipping cudagraphs due to ...") and its
    `cudagraph_skips` counter (tools/gpu_check/with_process_group.py --counters); graph breaks and
    recompiles are reported, not judged.
    """
    reasons = [m.group("reason").strip()[:300] for m in CUDAGRAPH_SKIP.finditer(log)]
    inductor = counters.get("inductor", {})
    skips = max(len(reasons), int(inductor.get("cudagraph_skips", 0)))
    figures: dict[str, Any] = {
        "cudagraph_skips": skips,
        "graph_breaks": sum(counters.get("graph_break", {}).values()) or len(GRAPH_BREAK.findall(log)),
    }
    if reasons:
        figures["cudagraph_skip_reasons"] = sorted(set(reasons))
    if skips:
        why = "; ".join(sorted(set(reasons))) or "see the log"
        return figures, f"inductor skipped CUDA graphs {skips} time(s): {why}"
    return figures, None


def compile_run(ctx: Context, mode: str, steps: int, log_every: int) -> None:
    """torch.compile (inductor) with `mode`: does it run, how long to the first window, how fast after, and
    (reduce-overhead) did inductor really use CUDA graphs."""
    if mode == "reduce-overhead" and ctx.device != "cuda":
        raise Skip(
            "CUDA graphs (train.compile_mode=reduce-overhead) need a CUDA device; on a CPU the mode is plain "
            "inductor, which compile_default runs"
        )
    cache = Path(ctx.env.get("TORCHINDUCTOR_CACHE_DIR", ""))
    warm = cache.is_dir() and any(cache.iterdir())
    run_dir = Path(ctx.work) / "run"
    ctx.watch(run_dir)
    counters_file = Path(ctx.work) / "compile_counters.json"
    args = short_run(ctx, run_dir, steps, log_every, "train.compile=true", f"train.compile_mode={mode}")
    command = [sys.executable, str(WITH_GROUP), "--counters", str(counters_file), "--", *args]
    # Why a graph broke or was recompiled, and why inductor skipped CUDA graphs, if it did.
    env = {"TORCH_LOGS": "recompiles,graph_breaks,cudagraphs"}
    done = ctx.run(command, "train", env=env, check=False)
    counters = json.loads(counters_file.read_text()) if counters_file.is_file() else {}
    verdict, problem = cudagraph_verdict(done.output, counters)
    ctx.record(
        wall_s=round(done.wall_s, 1),
        inductor_cache="warm" if warm else "cold",
        recompile_messages=done.output.count("Recompiling function"),
        **verdict,
        **startup_figures(done.output),
    )
    ctx.keep(counters_file)
    require_success(done, f"training with torch.compile mode={mode}")
    records = read_records(run_dir)
    figures = training_figures(records, batch_size(ctx))
    first_window_s = records[0]["step"] * batch_size(ctx) / max(float(records[0]["images_per_s"]), 1e-9)
    compile_s = first_window_s - records[0]["step"] * figures["ms_per_step"] / 1000
    ctx.record(**figures, first_window_s=round(first_window_s, 2), compile_s_estimate=round(compile_s, 1))
    keep_run(ctx, run_dir)
    require_finite(figures)
    if mode == "reduce-overhead" and problem:
        raise CheckFailed(problem)


def ensure_importable(ctx: Context, modules: dict[str, str], wheels: Path | None) -> dict[str, str]:
    """The environment for commands that import `modules` ({module: wheel name}): where one is missing and
    the bundle has its wheel, installed into the work folder (no network, nothing outside it changed)."""
    import importlib.util

    missing = [wheel for module, wheel in modules.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return {}
    if wheels is None or not wheels.is_dir():
        raise Skip(f"needs {', '.join(missing)}: not installed, and no bundle wheels folder to install from (--bundle)")
    target = Path(ctx.shared) / "site-packages"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), "--no-deps"]
    ctx.run([*cmd, "--target", str(target), *missing], "pip-install")
    ctx.record(installed_into_work_folder=missing)
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(target), ctx.env.get("PYTHONPATH")) if p)}


def tiny_classifier(path: Path) -> Path:
    """An untrained toy-sized `cifar10-classifier` (what --tiny measures with: the plumbing, not quality)."""
    import torch

    from tools.classifier import save_weights
    from trainer.quality import classifier as cf

    torch.manual_seed(0)
    recipe = {"arch": cf.ARCH_VERSION, "widths": [4, 8], "note": "untrained toy classifier of the GPU check's --tiny"}
    save_weights(cf.SmallConvNet((4, 8)), path, {"recipe": json.dumps(recipe)})
    return path


def late_means(records: list[dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    """One record per (arm, seed, BatchNorm mode): the mean FID and diversity of its generators at steps
    from `steps` // 2 on (tools/compare_quality.py's --snapshots and the final one)."""
    runs: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in records:
        if r["steps"] >= steps // 2:
            runs.setdefault((r["arm"], r["seed"], r["bn_stats"]), []).append(r)
    return [
        {
            "arm": arm,
            "seed": seed,
            "bn_stats": mode,
            "steps": sorted(r["steps"] for r in rows),
            "fid": statistics.mean(float(r["fid"]) for r in rows),
            "diversity": min(float(r.get("diversity", 1)) for r in rows),
        }
        for (arm, seed, mode), rows in sorted(runs.items())
    ]


def quality_verdict(records: list[dict[str, Any]], baseline: str = "classic") -> dict[str, dict[str, Any]]:
    """Per (arm, BatchNorm mode): mean and sd of the classifier FID over seeds, and the difference to the
    baseline arm with its standard error; `verdict` is `worse` / `better` when the difference passes both
    twice its standard error and 5% of the baseline's mean, else `within seed spread`."""
    by_key: dict[tuple[str, str], list[float]] = {}
    for r in records:
        by_key.setdefault((r["arm"], r["bn_stats"]), []).append(float(r["fid"]))
    summary: dict[str, dict[str, Any]] = {}
    for (arm, mode), fids in sorted(by_key.items()):
        sd = statistics.stdev(fids) if len(fids) > 1 else None
        entry: dict[str, Any] = {"seeds": len(fids), "fid_mean": round(statistics.mean(fids), 2), "fid_sd": sd}
        base = by_key.get((baseline, mode))
        if arm != baseline and base:
            diff = statistics.mean(fids) - statistics.mean(base)
            spread = [statistics.variance(v) / len(v) for v in (fids, base) if len(v) > 1]
            se = math.sqrt(sum(spread)) if len(spread) == 2 else None
            entry.update(diff_vs_baseline=round(diff, 2), diff_se=round(se, 2) if se is not None else None)
            if se is None:
                entry["verdict"] = "one seed: no verdict"
            elif abs(diff) > 2 * se and abs(diff) > 0.05 * statistics.mean(base):
                entry["verdict"] = "worse" if diff > 0 else "better"
            else:
                entry["verdict"] = "within seed spread"
        summary[f"{arm}/{mode}"] = entry
    return summary


def quality(
    ctx: Context,
    steps: int,
    seeds: list[int],
    arms: list[str],
    num_samples: int,
    parallel: int,
    classifier: str | None,
    wheels: str | None,
) -> None:
    """The 64x64 quality verdict: tools/compare_quality.py trains the classic loop and the trainer's arms
    from each seed for `steps` steps, side by side on this device, and scores every final generator with
    the offline classifier measure (FID on its features; lower is better) with BatchNorm running and
    batch statistics. Fails when the defaults (`ours`) score worse than the classic loop beyond seed
    spread (running statistics, the trainer's sampling default). Finished runs are kept in the work
    folder (keyed by the code): a rerun with the same --work only trains what is missing."""
    extra_env = ensure_importable(
        ctx, {"torch_fidelity": "torch-fidelity", "tqdm": "tqdm"}, Path(wheels) if wheels else None
    )
    if ctx.tiny:
        weights = tiny_classifier(Path(ctx.work) / "tiny-classifier.safetensors")
    elif classifier and Path(classifier).is_file():
        weights = Path(classifier)
    else:
        raise Skip(
            f"no classifier weights ({classifier or 'none given'}): put them in the bundle "
            "(tools/bundle_offline.sh --classifier FILE) or pass --classifier FILE; train them with "
            "`python -m tools.classifier train --data <cifar10-jpg>`"
        )
    out = Path(ctx.shared) / f"quality-{source_digest(Path(ctx.repo))}"
    ctx.record(weights=str(weights), runs_folder=str(out), steps=steps, seeds=seeds, arms=arms, num_samples=num_samples)
    root = data_root(ctx)
    cmd = [sys.executable, str(COMPARE_QUALITY), "--config", TINY_CONFIG if ctx.tiny else CLASSIC_CONFIG]
    cmd += ["--data", str(root / "train"), "--reference", str(root / "test"), "--steps", str(steps)]
    # One step's generator is a noisy sample of a run (GAN samples swing from step to step): the verdict
    # reads each run's mean over its generators from half the run on, in the trainer's sampling mode.
    snapshots = [steps // 2, steps * 3 // 4]
    cmd += ["--seeds", *map(str, seeds), "--arms", *arms, "--num-samples", str(num_samples), "--bn-stats", "running"]
    cmd += ["--snapshots", *map(str, snapshots)]
    cmd += ["--weights", str(weights), "--out", str(out), "--parallel", str(parallel), "--device", ctx.device]
    cmd += ["--classic-workers", "2", f"data.cache_dir={Path(ctx.shared) / 'packed'}"]
    threads = max(1, (os.cpu_count() or 1) // max(parallel, 1))
    cmd += ["--threads", str(threads)]
    if ctx.tiny:
        cmd.append("eval.batch_size=32")
    try:
        done = ctx.run(cmd, "compare-quality", env=extra_env, check=False)
    except Timeout:
        progress = {f"{a}-s{s}": run_figures(out / f"{a}-s{s}").get("steps", 0) for a in arms for s in seeds}
        ctx.record(steps_reached_at_the_cap=progress)
        raise
    ctx.record(wall_s=round(done.wall_s, 1))
    require_success(done, "tools/compare_quality.py")
    every = json.loads((out / f"quality-{steps}steps.json").read_text())
    records = [r for r in every if r["steps"] == steps]
    table = (out / f"quality-{steps}steps.md").read_text()
    ctx.keep(out / f"quality-{steps}steps.json")
    summary = quality_verdict(late_means(every, steps))
    ctx.record(verdicts=summary, verdicts_at_the_last_step=quality_verdict(records), table=table, runs=records)
    if ctx.tiny:
        ctx.record(note="toy size: an untrained toy classifier scores a few steps of toy networks; no verdict")
        return
    from trainer.monitor.diversity import COLLAPSE_BELOW

    collapsed = [
        f"{r['arm']} s{r['seed']} ({r['bn_stats']})" for r in records if r.get("diversity", 1) < COLLAPSE_BELOW
    ]
    if collapsed:
        raise CheckFailed(
            f"collapsed samples (diversity below {COLLAPSE_BELOW} of real images'): {', '.join(collapsed)}"
        )
    default = summary.get("ours/running", {})
    if default.get("verdict") == "worse":
        raise CheckFailed(
            f"the defaults score worse than the classic loop: classifier FID {default['fid_mean']} vs "
            f"{summary['classic/running']['fid_mean']} (difference {default['diff_vs_baseline']} ± {default['diff_se']})"
        )


def save_npz_within(images: Any, path: Path, limit_bytes: int) -> tuple[int, int]:
    """The first n of `images` (uint8 NHWC) as a compressed .npz (key arr_0, as trainer.sample writes)
    no larger than `limit_bytes`, n as large as fits. Returns (n, bytes)."""
    import numpy as np

    def write(n: int) -> int:
        with open(path, "wb") as fh:
            np.savez_compressed(fh, images[:n])
        return path.stat().st_size

    total = len(images)
    probe = min(total, 500)  # estimate the compressed size per image before compressing them all
    size = write(probe)
    if probe == total and size <= limit_bytes:
        return total, size
    n = min(total, max(1, int(limit_bytes * 0.95 * probe / size)))
    for _ in range(6):
        size = write(n)
        if size <= limit_bytes:
            return n, size
        n = max(1, int(n * limit_bytes / size * 0.95))
    raise CheckFailed(f"even {n} samples compress to {size} bytes, over the {limit_bytes}-byte limit")


def real_diversity(ctx: Context, resolution: int, count: int = 1000) -> float:
    """`pixel_diversity` of `count` training images through the trainer's data path at `resolution`."""
    import numpy as np
    import torch
    from PIL import Image

    from trainer.core.data import to_model_input
    from trainer.monitor.diversity import pixel_diversity

    files = sorted(p for p in (data_root(ctx) / "train").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    picks = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:count]
    arrays = [np.asarray(Image.open(files[int(i)]).convert("RGB").resize((32, 32))) for i in picks]
    return pixel_diversity(to_model_input(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), resolution))


def full_run(ctx: Context, num_samples: int, sample_reserve_s: float, stop_grace_s: float, epochs: int | None) -> None:
    """The classic recipe end to end (25 epochs, 64x64, global batch 64), timed; then `num_samples`
    samples of its final generator as a uint8 .npz, judged for collapse, and its last grid.

    If the cap would end it early, the trainer is asked to stop cleanly (its STOP file) in time to
    save a checkpoint, the figures say how far it got and extrapolate the whole run, the samples
    come from that checkpoint, and the check ends as a timeout.
    """
    run_dir = Path(ctx.work) / "run"
    ctx.watch(run_dir)
    overrides = [f"train.epochs={epochs}"] if epochs is not None else []
    args = trainer_args(ctx, run_dir, *overrides)
    train_budget = ctx.left() - sample_reserve_s
    ctx.record(train_budget_s=round(train_budget, 1))
    killed = None
    try:
        done = ctx.run(
            train_command(args),
            "train",
            timeout=train_budget,
            stop_file=run_dir / "STOP",
            stop_after_s=train_budget - stop_grace_s,
            check=False,
        )
        output, wall, stopped, returncode = done.output, done.wall_s, done.stopped, done.returncode
    except Timeout as exc:  # it did not stop in time after the STOP file: read what it left
        killed = str(exc)
        logs = sorted(Path(ctx.logs).glob("*-train.log"))
        output = logs[-1].read_text(errors="replace") if logs else ""
        wall, stopped, returncode = train_budget, True, None
    startup = startup_figures(output)
    records = read_records(run_dir)
    batch = batch_size(ctx)
    steps_done = records[-1]["step"] if records else 0
    total = startup.get("total_steps")
    train_s = window_seconds(records, batch)
    figures: dict[str, Any] = {
        **startup,
        "wall_s": round(wall, 1),
        "steps_done": steps_done,
        "epochs_done": records[-1]["epoch"] if records else 0,
        "completed": bool(total) and steps_done == total and not killed,
        "stopped_by_cap": stopped,
        "train_s": round(train_s, 1),
        "startup_and_saves_s": round(wall - train_s, 1),
        "images_per_s_overall": round(steps_done * batch / train_s, 1) if train_s else None,
    }
    if records:
        figures.update(training_figures(records, batch))
    if total and steps_done and not figures["completed"]:
        figures["extrapolated_total_s"] = round(wall + (total - steps_done) * train_s / steps_done, 1)
    ctx.record(**figures)
    keep_run(ctx, run_dir)
    if killed is None and returncode != 0:
        raise CheckFailed(f"training exited with code {returncode}; last output:\n{tail(output)}")
    if records:
        require_finite(figures)
    grid = last_grid(run_dir)
    if grid is not None:
        ctx.export(grid, "grid_full_run.png")
        ctx.record(grid_source=grid.name)
    if (run_dir / "samples" / "real.png").is_file():
        ctx.export(run_dir / "samples" / "real.png", "real.png")

    sample_full_run(ctx, run_dir, num_samples, startup.get("total_steps"))
    if not figures["completed"]:
        cut = f"at step {steps_done} of {total}" if total else "before its first log step"
        extrapolated = figures.get("extrapolated_total_s")
        raise Timeout(
            f"the cap ended training {cut}"
            + (f"; the whole run extrapolates to {extrapolated:.0f}s end to end" if extrapolated else "")
            + (f" ({killed})" if killed else "")
        )


def sample_full_run(ctx: Context, run_dir: Path, num_samples: int, total_steps: int | None) -> None:
    """`python -m trainer.sample` from the run's newest checkpoint, judged for collapse, kept whole in the
    work folder and returned in the part that fits safely under the per-file limit, with the generator
    to regenerate the rest."""
    import numpy as np
    import torch

    from trainer.monitor.diversity import pixel_diversity

    npz = Path(ctx.work) / "samples.npz"
    cmd = [sys.executable, "-m", "trainer.sample", str(run_dir), "--out", str(npz), "--num", str(num_samples)]
    done = ctx.run([*cmd, "--seed", "0"], "sample")
    with np.load(npz) as archive:
        images = archive["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != num_samples or images.shape[3] != 3:
        raise CheckFailed(f"samples: expected ({num_samples}, H, W, 3) uint8, got {images.shape} {images.dtype}")
    sample = torch.from_numpy(images[:1000]).permute(0, 3, 1, 2)
    diversity = pixel_diversity(sample) / real_diversity(ctx, images.shape[1])
    ctx.record(
        sample_s=round(done.wall_s, 1),
        samples=int(images.shape[0]),
        sample_shape=list(images.shape),
        samples_sha256=hashlib.sha256(images.tobytes()).hexdigest(),
        samples_uncompressed_MiB=round(images.nbytes / 2**20, 1),
        samples_diversity=round(diversity, 4),
        samples_path_on_device=str(npz),
    )
    # Safely under the limit: 1/16 of it spare for the archive's own overhead and any rounding of sizes.
    kept, size = save_npz_within(images, Path(ctx.work) / "samples_returned.npz", ctx.max_file_bytes * 15 // 16)
    ctx.export(Path(ctx.work) / "samples_returned.npz", "samples.npz")
    ctx.record(
        samples_returned=kept,
        samples_returned_MiB=round(size / 2**20, 2),
        samples_note=(
            "all samples"
            if kept == num_samples
            else f"the first {kept} of {num_samples}: all of them do not fit the per-file limit; "
            f"generator.safetensors + seed 0 regenerate them (see docs/gpu.md)"
        ),
    )
    if (run_dir / "generator.safetensors").is_file():
        ctx.export(run_dir / "generator.safetensors", "generator.safetensors")
    judge_diversity(ctx, diversity, f"the run's {min(len(images), 1000)} first samples")


# ---- the registry -------------------------------------------------------------------------------

M = "tools.gpu_check.checks"


def registry(
    tiny: bool, data_source: str | None, bundle: str | None = None, classifier: str | None = None
) -> list[Check]:
    """The checks in the order they run, with caps for a GPU or for --tiny.

    Order is importance: what every figure needs (environment, data), the headline throughput (ours
    against the classic loop), the 64x64 quality verdict, each precision on CUDA, the fp16 overflow
    path, NCCL and two ranks, the large batch, then compile and CUDA graphs (the least certain:
    first to be squeezed), and last the full 25-epoch run, which takes whatever is left but always
    keeps its reserve (cut early, it stops cleanly and extrapolates the whole run's time).

    GPU caps are sized for the 525 s default budget; each check has a minimum it can succeed in and is
    skipped for budget rather than started with less. --tiny caps allow for a loaded 2-core machine
    (the whole tiny run takes about 6 minutes on an idle one; give it --budget-s 1200 on a busy one).
    """
    steps, log_every = (6, 2) if tiny else (500, 100)  # 500 steps: past the uniform start (diversity 0.45+)
    needs = ("environment", "data")
    wheels = str(Path(bundle) / "wheels") if bundle else None

    def cap(gpu: float, cpu: float) -> float:
        return cpu if tiny else gpu

    def short(name: str, target: str, gpu_cap: float, about: str, **params: Any) -> Check:
        return Check(
            name, f"{M}:{target}", cap(gpu_cap, 180), min_s=cap(25, 20), params=params, needs=needs, about=about
        )

    return [
        Check(
            "environment",
            f"{M}:environment",
            cap(30, 120),
            params={"bundle": bundle},
            about="versions, the device, the code",
        ),
        Check(
            "data",
            f"{M}:data",
            cap(90, 240),
            params={"source": data_source},
            about="CIFAR-10 JPEGs unpacked and packed (python -m trainer.prepare)",
        ),
        Check(
            "bench_64",
            f"{M}:bench",
            cap(60, 180),
            min_s=cap(40, 20),
            params={"batch": TINY_BATCH if tiny else 64, "steps": 3 if tiny else 50, "warmup": 1 if tiny else 10},
            needs=needs,
            about="python -m trainer.bench, global batch 64: the GAN step (no logging) against the classic loop",
        ),
        Check(
            "quality_64",
            f"{M}:quality",
            cap(200, 360),
            min_s=cap(120, 60),
            params={
                "steps": 4 if tiny else 2000,
                "seeds": [0] if tiny else [0, 1, 2],
                "arms": ["classic", "ours"] if tiny else ["classic", "ours", "ours-fp16"],
                "num_samples": 64 if tiny else 10000,
                "parallel": 2 if tiny else 9,
                "classifier": classifier,
                "wheels": wheels,
            },
            needs=needs,
            about="the classic loop vs the defaults (and fp16), 3 seeds x 2,000 steps at 64x64, classifier FID",
        ),
        *[
            short(
                name,
                "precision",
                40,
                f"classic config, {steps} steps, train.mixed_precision={p}",
                precision=p,
                steps=steps,
                log_every=log_every,
            )
            for name, p in (("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "no"))
        ],
        short(
            "fp16_overflow",
            "fp16_overflow",
            40,
            f"fp16 GAN step, grad scaler started at 2^{int(math.log2(FORCED_INIT_SCALE))}: skipped steps = halvings",
            steps=6 if tiny else 40,
        ),
        short(
            "one_rank_nccl",
            "one_rank_nccl",
            45,
            "torchrun, 1 rank, NCCL, DDP device_ids=[0], SyncBatchNorm",
            steps=steps,
            log_every=log_every,
        ),
        Check(
            "two_processes_gloo",
            f"{M}:two_processes_gloo",
            cap(60, 240),
            min_s=cap(35, 30),
            params={"steps": steps, "log_every": log_every},
            needs=needs,
            about="accelerate launch, 2 ranks on one device, gloo (NCCL refuses two ranks on one GPU)",
        ),
        Check(
            "bench_512",
            f"{M}:bench",
            cap(60, 180),
            min_s=cap(40, 20),
            # --tiny: without the classic loop, which bench_64 already ran (one process fewer on a slow CPU)
            params={
                "batch": 2 * TINY_BATCH if tiny else 512,
                "steps": 3 if tiny else 30,
                "warmup": 1 if tiny else 5,
                "reference": not tiny,
            },
            needs=needs,
            about="python -m trainer.bench, global batch 512, against the classic loop",
        ),
        *[
            Check(
                name,
                f"{M}:compile_run",
                cap(90, 300),
                # reduce-overhead finds compile_default's kernels in the inductor cache: less to compile
                min_s=cap(60 if mode == "default" else 45, 30),
                params={"mode": mode, "steps": 4 if tiny else 300, "log_every": log_every},
                needs=needs,
                about=about,
            )
            for name, mode, about in (
                ("compile_default", "default", "train.compile=true (inductor)"),
                (
                    "compile_reduce_overhead",
                    "reduce-overhead",
                    "compile_mode=reduce-overhead: fails if CUDA graphs are skipped",
                ),
            )
        ],
        Check(
            "full_run",
            f"{M}:full_run",
            None,
            reserve_s=cap(90, 90),
            min_s=cap(60, 20),
            params={
                "num_samples": 200 if tiny else 10000,
                "sample_reserve_s": cap(30, 40),
                "stop_grace_s": cap(12, 8),
                "epochs": 2 if tiny else None,
            },
            needs=needs,
            about="the classic recipe, 25 epochs, timed end to end (extrapolated if cut); 10k samples, the last grid",
        ),
    ]
