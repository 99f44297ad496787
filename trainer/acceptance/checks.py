"""The acceptance checks. Each drives the trainer through its command lines and reads what it wrote.

Every check is `fn(ctx, **params)` (see runner.Context): it runs commands with `ctx.run`, records
figures with `ctx.record` as soon as it has them, and raises Skip / CheckFailed / Timeout to say how
it ended. `registry()` lists them with their caps: one set of sizes for a GPU, one for `--tiny`.

What the trainer is asked through (re-point here if they move): `python -m trainer.train`,
`python -m trainer.bench`, `python -m trainer.sample`, `accelerate launch <script>`, the run folder's
metrics.jsonl / samples/*.png / generator.safetensors / STOP file, and the one start-up line of the
loop ("N images, S steps/epoch ... device D, precision P, BatchNorm").
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

from trainer.acceptance.runner import Check, CheckFailed, Completed, Context, Skip, Timeout, tail
from trainer.acceptance.shim import BACKEND_ENV, INIT_SCALE_ENV, MARK

REPO = Path(__file__).resolve().parents[2]
SHIM_SCRIPT = REPO / "trainer" / "acceptance" / "shim.py"
CLASSIC_CONFIG = "configs/dcgan_cifar10.yaml"  # 64x64, global batch 64, 25 epochs, bf16
TINY_CONFIG = "configs/smoke.yaml"  # 32x32, nz 16, ngf/ndf 8, global batch 16
CLASSIC_BATCH, TINY_BATCH = 64, 16
TINY_TRAIN_IMAGES, TINY_TEST_IMAGES = 96, 16
FORCED_INIT_SCALE = 2.0**40  # fp16 gradients of this DCGAN overflow at any scale much above 2**20
NEVER = "1000000"  # a step interval no check reaches: no mid-run checkpoints or grids inside a timing window

STARTUP = re.compile(
    r"(?P<images>\d+) images, (?P<steps_per_epoch>\d+) steps/epoch of (?P<global_batch>\d+) images "
    r"\((?P<per_process>\d+) per process x (?P<processes>\d+)\), (?P<total_steps>\d+) steps in all; "
    r"device (?P<device>\S+), precision (?P<precision>\S+), (?P<norm>SyncBatchNorm|BatchNorm)"
)
SHIM_LINE = re.compile(
    re.escape(MARK) + r" rank (?P<rank>\d+)/(?P<world>\d+) backend (?P<backend>\S+) distributed_type (?P<type>\S+) "
    r"device (?P<device>\S+) mixed_precision (?P<precision>\S+) grad_scaler_init_scale (?P<scale>\S+) "
    r"bypass_device_map (?P<bypass_device_map>\S+)"
)


# ---- commands -----------------------------------------------------------------------------------


def batch_size(ctx: Context) -> int:
    return TINY_BATCH if ctx.tiny else CLASSIC_BATCH


def data_root(ctx: Context) -> Path:
    """The folder holding train/ (and test/): a link the data check points at the real one."""
    return Path(ctx.shared) / "data"


def trainer_args(ctx: Context, run_dir: Path, *overrides: str) -> list[str]:
    """Config and overrides shared by every check: the classic recipe (or the smoke nets with --tiny) on
    the JPEG folder, packed once into a cache all checks share, no tracker, no FID (its InceptionV3
    weights cannot be fetched on the GPU machine), a fresh run folder."""
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


def train_command(args: list[str], shim: bool = False) -> list[str]:
    return [sys.executable, "-m", "trainer.acceptance.shim" if shim else "trainer.train", *args]


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


def shim_ranks(output: str) -> list[dict[str, Any]]:
    return [
        {k: int(v) if v.isdigit() else v for k, v in m.groupdict().items()}
        for m in SHIM_LINE.finditer(output)
        if m.group("rank").isdigit()
    ]


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


# ---- the checks ---------------------------------------------------------------------------------


def environment(ctx: Context) -> None:
    """Versions, the device, the commit: the context every figure below needs."""

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    names = ("torch", "accelerate", "torchvision", "numpy", "omegaconf", "torch-fidelity", "wandb")
    figures: dict[str, Any] = {
        "python": platform.python_version(),
        **{name: version(name) for name in names},
        "cpu_count": os.cpu_count(),
    }
    if ctx.device == "cuda":
        import torch  # only here: on a CPU run, importing torch would cost seconds for nothing

        figures.update(
            torch=torch.__version__,
            torch_cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            cuda_available=torch.cuda.is_available(),
        )
    if figures.get("cuda_available"):
        props = torch.cuda.get_device_properties(0)
        figures.update(
            device_name=props.name,
            device_count=torch.cuda.device_count(),
            capability=f"{props.major}.{props.minor}",
            device_memory_GiB=round(props.total_memory / 2**30, 1),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ctx.repo, capture_output=True, text=True, check=False)
    figures["git_commit"] = git.stdout.strip() if git.returncode == 0 else None
    stamp = Path(ctx.repo) / ".device" / "commit.txt"  # the GPU copy has no .git: the prepare script wrote this
    if figures["git_commit"] is None and stamp.is_file():
        lines = stamp.read_text().splitlines()
        figures.update(git_commit=lines[0] if lines else None, git_local_changes=lines[1:])
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        figures["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    ctx.record(**figures)
    if ctx.device == "cuda" and not figures["cuda_available"]:
        raise CheckFailed("--device cuda, but torch.cuda.is_available() is False here")
    try:  # by import, not metadata: docs/gpu.md's fallback puts the omegaconf wheel itself on PYTHONPATH
        import omegaconf

        ctx.record(omegaconf=f"{omegaconf.__version__} ({Path(omegaconf.__file__).parents[1]})")
    except ImportError:
        raise CheckFailed("omegaconf is not importable: the trainer cannot read its config (see docs/gpu.md)") from None


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


def data(ctx: Context, source: str | None) -> None:
    """The data every check trains on: the CIFAR-10 JPEG tarball unpacked (or a folder, or a toy tree)."""
    link = data_root(ctx)
    unpacked = Path(ctx.shared) / "data-files"
    for path in (link, unpacked):
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
    start = time.monotonic()
    if source is None:
        if not ctx.tiny:
            raise CheckFailed(
                "no data: pass --data PATH, the CIFAR-10 JPEG tarball (cifar10-jpg.tar.gz) or the folder holding train/"
            )
        write_tiny_tree(unpacked)
        kind, base = "generated toy tree", unpacked
    else:
        src = Path(source).resolve()
        if src.is_dir():
            kind, base = "folder", src
        elif src.is_file() and tarfile.is_tarfile(src):
            unpacked.mkdir(parents=True)
            if shutil.which("tar"):  # GNU tar: 5x quicker than tarfile on CIFAR-10's 60k small files
                subprocess.run(["tar", "-xzf", str(src), "-C", str(unpacked)], check=True, capture_output=True)
            else:
                with tarfile.open(src) as archive:
                    # filter="data" refuses links and paths outside the folder (Python 3.12; 3.11.4+)
                    extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                    archive.extractall(unpacked, **extra)
            kind, base = "tarball", unpacked
        else:
            raise CheckFailed(f"--data {source}: neither a folder nor a tar archive")
    # The tarball holds train/ at its top; accept one folder level above it too (cifar10-jpg/train).
    holders = [base, *sorted(p for p in base.iterdir() if p.is_dir())]
    holder = next((p for p in holders if (p / "train").is_dir()), None)
    if holder is None:
        raise CheckFailed(f"no train/ folder in {source or base} (expected train/<class>/*.jpg)")
    link.symlink_to(holder, target_is_directory=True)
    train_images = _count_images(holder / "train")
    ctx.record(
        source=source or "generated",
        kind=kind,
        prepare_s=round(time.monotonic() - start, 2),
        train_images=train_images,
        test_images=_count_images(holder / "test"),
        classes=sorted(p.name for p in (holder / "train").iterdir() if p.is_dir()),
    )
    needed = 2 * TINY_BATCH if ctx.tiny else 512  # the largest global batch of the checks
    if train_images < needed:
        raise CheckFailed(f"only {train_images} training images under {holder / 'train'}; the checks need {needed}+")
    if not ctx.tiny and train_images != 50000:
        ctx.record(note=f"{train_images} training images, not CIFAR-10's 50000: figures are not the classic recipe's")


def precision(ctx: Context, precision: str, steps: int, log_every: int) -> None:
    """The classic config for `steps` steps in one precision: finite losses, speed, peak GPU memory."""
    run_dir = Path(ctx.work) / "run"
    args = trainer_args(
        ctx,
        run_dir,
        f"train.mixed_precision={precision}",
        f"train.max_steps={steps}",
        f"log.every_steps={log_every}",
        f"log.sample_every_steps={NEVER}",
        f"ckpt.every_steps={NEVER}",
    )
    done = ctx.run(train_command(args), "train", check=False)
    ctx.record(wall_s=round(done.wall_s, 1), **startup_figures(done.output))
    refused_on_cpu(ctx, done)
    require_success(done, "training")
    figures = training_figures(read_records(run_dir), batch_size(ctx))
    ctx.record(**figures)
    keep_run(ctx, run_dir)
    require_finite(figures)
    if figures["steps"] != steps:
        raise CheckFailed(f"the run ended at step {figures['steps']}, not {steps}")


def fp16_overflow(ctx: Context, steps: int, log_every: int, init_scale: float = FORCED_INIT_SCALE) -> None:
    """fp16 with the grad scaler started far too high: every overflow skips an optimizer step and halves
    the scale, so the skipped-step counters must be non-zero and add up to log2(initial / final scale).

    Both optimizers share Accelerate's one scaler and each step() ends with scaler.update(), so one
    skipped D or G step is one halving: skipped_steps_D + skipped_steps_G = number of halvings (with
    no growth: the scale doubles only after 2000 clean updates, and this run makes 2 x steps < 2000).
    """
    run_dir = Path(ctx.work) / "run"
    args = trainer_args(
        ctx,
        run_dir,
        "train.mixed_precision=fp16",
        f"train.max_steps={steps}",
        f"log.every_steps={log_every}",
        f"log.sample_every_steps={NEVER}",
        f"ckpt.every_steps={NEVER}",
    )
    done = ctx.run(train_command(args, shim=True), "train", env={INIT_SCALE_ENV: repr(init_scale)}, check=False)
    ranks = shim_ranks(done.output)
    ctx.record(
        wall_s=round(done.wall_s, 1),
        init_scale=init_scale,
        scaler_init_scale_seen=ranks[0]["scale"] if ranks else None,
        **startup_figures(done.output),
    )
    refused_on_cpu(ctx, done)
    require_success(done, "training")
    figures = training_figures(read_records(run_dir), batch_size(ctx))
    ctx.record(**figures)
    keep_run(ctx, run_dir)
    if "loss_scale" not in figures:
        raise CheckFailed("metrics.jsonl has no loss_scale: the run had no grad scaler")
    skipped_d, skipped_g = int(figures.get("skipped_steps_D", 0)), int(figures.get("skipped_steps_G", 0))
    verdict, problem = judge_overflow(init_scale, float(figures["loss_scale"]), skipped_d, skipped_g)
    ctx.record(**verdict, growth_possible=2 * steps >= 2000)
    if problem:
        raise CheckFailed(problem)
    require_finite(figures)


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


def two_processes(ctx: Context, steps: int, log_every: int, backend: str = "gloo") -> None:
    """Two ranks on one device through `accelerate launch`. NCCL refuses two ranks on one GPU, so the
    shim asks Accelerate for a gloo process group: DDP and SyncBatchNorm then run on CUDA tensors that
    gloo moves through host memory. On a CPU-only machine this is the usual gloo (MULTI_CPU) launch."""
    run_dir = Path(ctx.work) / "run"
    args = trainer_args(
        ctx,
        run_dir,
        f"train.max_steps={steps}",
        f"log.every_steps={log_every}",
        f"log.sample_every_steps={NEVER}",
        f"ckpt.every_steps={NEVER}",
    )
    env = {BACKEND_ENV: backend, "OMP_NUM_THREADS": "1"}  # two ranks share the cores
    done = ctx.run(launch_command(SHIM_SCRIPT, args, 2), "launch", env=env, check=False)
    ranks = sorted(shim_ranks(done.output), key=lambda r: r["rank"])
    startup = startup_figures(done.output)
    ctx.record(wall_s=round(done.wall_s, 1), ranks=ranks, requested_backend=backend, **startup)
    require_success(done, "accelerate launch with 2 processes")
    figures = training_figures(read_records(run_dir), batch_size(ctx))
    ctx.record(**figures)
    keep_run(ctx, run_dir)
    require_finite(figures)
    if len(ranks) != 2 or {r["world"] for r in ranks} != {2}:
        raise CheckFailed(f"expected 2 ranks in a world of 2, the shim saw {ranks}")
    if startup.get("processes") != 2:
        raise CheckFailed(f"the loop did not report 2 processes: {startup}")
    if ctx.device == "cuda" and startup.get("norm") != "SyncBatchNorm":
        raise CheckFailed(f"a multi-process CUDA run should use SyncBatchNorm (train.sync_bn=auto); it used {startup}")


def compile_run(ctx: Context, mode: str, steps: int, log_every: int) -> None:
    """torch.compile (inductor) with `mode`: does it run, how long to the first window, how fast after."""
    if mode == "reduce-overhead" and ctx.device != "cuda":
        raise Skip(
            "CUDA graphs (train.compile_mode=reduce-overhead) need a CUDA device; on a CPU the mode is plain "
            "inductor, which compile_default runs"
        )
    cache = Path(ctx.env.get("TORCHINDUCTOR_CACHE_DIR", ""))
    warm = cache.is_dir() and any(cache.iterdir())
    run_dir = Path(ctx.work) / "run"
    args = trainer_args(
        ctx,
        run_dir,
        "train.compile=true",
        f"train.compile_mode={mode}",
        f"train.max_steps={steps}",
        f"log.every_steps={log_every}",
        f"log.sample_every_steps={NEVER}",
        f"ckpt.every_steps={NEVER}",
    )
    # Why a graph was recompiled, and (artifact "cudagraphs") why inductor skipped CUDA graphs, if it did.
    done = ctx.run(train_command(args), "train", env={"TORCH_LOGS": "recompiles,cudagraphs"}, check=False)
    skips = [line.strip() for line in done.output.splitlines() if "skipping cudagraphs" in line]
    ctx.record(
        wall_s=round(done.wall_s, 1),
        inductor_cache="warm" if warm else "cold",
        recompiles=done.output.count("Recompiling function"),
        cudagraph_skips=len(skips),
        **({"cudagraph_skip_reason": skips[0][:300]} if skips else {}),
        **startup_figures(done.output),
    )
    require_success(done, f"training with torch.compile mode={mode}")
    records = read_records(run_dir)
    figures = training_figures(records, batch_size(ctx))
    first_window_s = records[0]["step"] * batch_size(ctx) / max(float(records[0]["images_per_s"]), 1e-9)
    compile_s = first_window_s - records[0]["step"] * figures["ms_per_step"] / 1000
    ctx.record(**figures, first_window_s=round(first_window_s, 2), compile_s_estimate=round(compile_s, 1))
    keep_run(ctx, run_dir)
    require_finite(figures)


def bench(ctx: Context, batch: int, steps: int, warmup: int, reference: bool = True) -> None:
    """`python -m trainer.bench` at one global batch: ours against the classic loop, same data."""
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
        if r.get("flops_per_step") and figures["bf16_matmul_tflops"]:
            achieved = r["flops_per_step"] / (r["ms_per_step"] / 1000) / 1e12
            figures[f"{name}_tflops"] = round(achieved, 2)
            figures[f"{name}_fraction_of_bf16_matmul"] = round(achieved / figures["bf16_matmul_tflops"], 4)
    figures["memory_kind"] = next(iter(by_name.values()))["memory_kind"] if by_name else None
    if "ours" in by_name and "reference" in by_name:
        ratio = by_name["ours"]["images_per_s"] / by_name["reference"]["images_per_s"]
        figures["speedup_vs_reference"] = round(ratio, 3)
    return by_name, figures


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


def full_run(ctx: Context, num_samples: int, sample_reserve_s: float, stop_grace_s: float, epochs: int | None) -> None:
    """The classic recipe end to end (25 epochs, 64x64, global batch 64), timed; then `num_samples`
    samples of its final generator as a uint8 .npz, and its last grid.

    If the cap would end it early, the trainer is asked to stop cleanly (its STOP file) in time to
    save a checkpoint, the figures say how far it got and extrapolate the whole run, the samples
    come from that checkpoint, and the check ends as a timeout.
    """
    run_dir = Path(ctx.work) / "run"
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

    sample_full_run(ctx, run_dir, num_samples)
    if not figures["completed"]:
        cut = f"at step {steps_done} of {total}" if total else "before its first log step"
        extrapolated = figures.get("extrapolated_total_s")
        raise Timeout(
            f"the cap ended training {cut}"
            + (f"; the whole run extrapolates to {extrapolated:.0f}s end to end" if extrapolated else "")
            + (f" ({killed})" if killed else "")
        )


def sample_full_run(ctx: Context, run_dir: Path, num_samples: int) -> None:
    """`python -m trainer.sample` from the run's newest checkpoint, kept whole in the work folder and
    returned in the part that fits the per-file limit, with the generator to regenerate the rest."""
    import numpy as np

    npz = Path(ctx.work) / "samples.npz"
    cmd = [sys.executable, "-m", "trainer.sample", str(run_dir), "--out", str(npz), "--num", str(num_samples)]
    done = ctx.run([*cmd, "--seed", "0"], "sample")
    with np.load(npz) as archive:
        images = archive["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != num_samples or images.shape[3] != 3:
        raise CheckFailed(f"samples: expected ({num_samples}, H, W, 3) uint8, got {images.shape} {images.dtype}")
    ctx.record(
        sample_s=round(done.wall_s, 1),
        samples=int(images.shape[0]),
        sample_shape=list(images.shape),
        samples_sha256=hashlib.sha256(images.tobytes()).hexdigest(),
        samples_uncompressed_MiB=round(images.nbytes / 2**20, 1),
        samples_mean=round(float(images.mean()), 2),
        samples_std=round(float(images.std()), 2),
        samples_path_on_device=str(npz),
    )
    kept, size = save_npz_within(images, Path(ctx.work) / "samples_returned.npz", ctx.max_file_bytes)
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


# ---- the registry -------------------------------------------------------------------------------

M = "trainer.acceptance.checks"


def registry(tiny: bool, data_source: str | None) -> list[Check]:
    """The checks in the order they run, with caps for a GPU or for --tiny.

    GPU caps are sized for the 420 s default budget: the full run keeps a 220 s reserve and gets
    everything the others leave; the others sum to more than the rest, so the last of them (the
    least essential: reduce-overhead, batch 512) are the ones a slow machine squeezes out.
    """
    steps, log_every = (6, 2) if tiny else (200, 50)
    compile_steps = 4 if tiny else 300
    needs = ("environment", "data")

    def cap(gpu: float, cpu: float) -> float:
        return cpu if tiny else gpu

    return [
        Check("environment", f"{M}:environment", cap(30, 60), about="versions, the device, the commit"),
        Check("data", f"{M}:data", cap(90, 120), params={"source": data_source}, about="CIFAR-10 JPEGs unpacked"),
        *[
            Check(
                name,
                f"{M}:precision",
                cap(45, 60),
                params={"precision": p, "steps": steps, "log_every": log_every},
                needs=needs,
                about=f"classic config, {steps} steps, train.mixed_precision={p}",
            )
            for name, p in (("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "no"))
        ],
        Check(
            "fp16_overflow",
            f"{M}:fp16_overflow",
            cap(45, 60),
            params={"steps": steps, "log_every": log_every},
            needs=needs,
            about=f"fp16, grad scaler started at 2^{int(math.log2(FORCED_INIT_SCALE))}: skipped steps = scale halvings",
        ),
        Check(
            "bench_64",
            f"{M}:bench",
            cap(60, 90),
            params={"batch": TINY_BATCH if tiny else 64, "steps": 3 if tiny else 50, "warmup": 1 if tiny else 10},
            needs=needs,
            about="python -m trainer.bench, global batch 64, ours vs the classic loop",
        ),
        Check(
            "two_processes",
            f"{M}:two_processes",
            cap(60, 90),
            params={"steps": 6 if tiny else 100, "log_every": log_every},
            needs=needs,
            about="accelerate launch --num_processes 2 on one device, gloo process group",
        ),
        Check(
            "compile_default",
            f"{M}:compile_run",
            cap(90, 150),
            params={"mode": "default", "steps": compile_steps, "log_every": log_every},
            needs=needs,
            about="train.compile=true (inductor)",
        ),
        Check(
            "compile_reduce_overhead",
            f"{M}:compile_run",
            cap(90, 150),
            params={"mode": "reduce-overhead", "steps": compile_steps, "log_every": log_every},
            needs=needs,
            about="train.compile=true compile_mode=reduce-overhead (CUDA graphs)",
        ),
        Check(
            "bench_512",
            f"{M}:bench",
            cap(75, 90),
            # --tiny: without the classic loop, which bench_64 already ran (one process fewer on a slow CPU)
            params={
                "batch": 2 * TINY_BATCH if tiny else 512,
                "steps": 3 if tiny else 30,
                "warmup": 1 if tiny else 5,
                "reference": not tiny,
            },
            needs=needs,
            about="python -m trainer.bench, global batch 512, ours vs the classic loop",
        ),
        Check(
            "full_run",
            f"{M}:full_run",
            None,
            reserve_s=cap(220, 40),
            min_s=cap(60, 20),
            params={
                "num_samples": 200 if tiny else 10000,
                "sample_reserve_s": cap(35, 15),
                "stop_grace_s": cap(15, 8),
                "epochs": 2 if tiny else None,
            },
            needs=needs,
            about="the classic recipe, 25 epochs, timed end to end; 10k samples and the last grid",
        ),
    ]
