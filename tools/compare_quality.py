"""Does our trainer train GANs as well as the classic loop? Train both, then measure their samples.

    python tools/compare_quality.py --config configs/dcgan_cifar10.yaml \\
        --data data/cifar10-jpg/train --reference data/cifar10-jpg/test \\
        --steps 2000 --seeds 0 1 2 --arms classic ours --out runs/quality

Arms (each trained for --steps steps from each seed, on the same images, with the same config):

- `classic`: the PyTorch DCGAN example's loop as trainer.bench keeps it (`build_reference`: PIL
  transforms in a DataLoader, fp32, Sigmoid + BCELoss, D's gradients computed in the G step);
- `ours`: the trainer through its command line (trainer/train.py), with the config's defaults;
- ablations, ours with one numerics-changing optimisation off: `ours-fp32`
  (train.mixed_precision=no), `ours-nchw` (train.channels_last=false), `ours-unpacked`
  (data.packed=false: PIL resize on the host instead of on-device resize). D frozen in the G step
  needs no ablation: it only skips D gradients that the classic loop computes and then zeroes;
- `ours-fp16` (train.mixed_precision=fp16, CUDA only): the other mixed precision `auto` can pick.

Each final generator is then measured the same way, by trainer.quality.fid.Evaluator with the offline
`cifar10-classifier` extractor (trainer/quality/classifier.py): FID-like distance and classifier
score of --num-samples samples (latent i from (eval.seed, i), shared by all runs) against the
--reference images, with BatchNorm's running statistics (`running`, eval mode: what trainer.sample
and trainer.evaluate do by default), its batch statistics (`batch`, train mode in batches of
eval.batch_size: what the classic loop's grids do), or both (--bn-stats).

Each measurement also has `diversity`: the per-pixel standard deviation across 1,000 samples
relative to that of 1,000 reference images (trainer/monitor/diversity.py; near 0 means collapse).

One step's generator is a noisy sample of a run's quality (GAN samples oscillate from step to step):
with --snapshots the generators at those steps are kept and measured too, and a second table gives
each run's mean over the snapshots from half the run on, which varies less between seeds.

Runs are kept under --out/<arm>-s<seed>/ and not retrained when their final weights exist, nor
remeasured when their measurement is stored beside them, so a comparison can grow seed by seed and
an interrupted one resumes. Every training runs in its own process with --threads threads;
--parallel trains several at once (on a GPU the small 64x64 steps leave room for many), and the
classic loop's DataLoader can have --classic-workers workers (the numbers do not change with it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: import this checkout's trainer

from trainer.bench import build_reference  # noqa: E402
from trainer.core.config import Config, load_config  # noqa: E402
from trainer.core.models import Generator  # noqa: E402
from trainer.quality.classifier import NAME as CLASSIFIER  # noqa: E402

ARMS: dict[str, list[str] | None] = {
    "classic": None,  # not the trainer: trainer.bench's reference loop
    "ours": [],
    "ours-fp32": ["train.mixed_precision=no"],
    "ours-nchw": ["train.channels_last=false"],
    "ours-unpacked": ["data.packed=false"],
    "ours-fp16": ["train.mixed_precision=fp16"],
}
WEIGHTS = "generator.safetensors"  # the final generator, in the run directory, as the trainer writes it
SNAPSHOTS = "snapshots"  # <run dir>/snapshots/step-XXXXXXXX.safetensors: G at the --snapshots steps


def snapshot_path(run_dir: Path, step: int) -> Path:
    return run_dir / SNAPSHOTS / f"step-{step:08d}.safetensors"


def _g_state(netG: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in netG.state_dict().items()}


def train_classic(cfg: Config, steps: int, run_dir: Path, num_workers: int = 0, snapshots: list[int] = ()) -> None:
    """The reference loop for `steps` steps (epochs wrap around), then its generator as safetensors;
    G also at each of the `snapshots` steps."""
    step, loader, netG, _ = build_reference(cfg, num_workers=num_workers)  # 0: PIL in the main process
    done, start = 0, time.perf_counter()
    window = start
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as log:
        while done < steps:
            for batch in loader:
                losses = step(batch, done)
                done += 1
                if done % 50 == 0:  # like the trainer's metrics.jsonl: losses and images/s of the last window
                    now = time.perf_counter()
                    rate = 50 * cfg.train.batch_size / (now - window)
                    row = {"step": done, "images_per_s": rate, **{k: float(v) for k, v in losses.items()}}
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    window = now
                if done in snapshots and done != steps:
                    snapshot_path(run_dir, done).parent.mkdir(exist_ok=True)
                    save_file(_g_state(netG), str(snapshot_path(run_dir, done)), {"step": str(done)})
                if done == steps:
                    break
    seconds = time.perf_counter() - start
    save_file(_g_state(netG), str(run_dir / WEIGHTS), {"step": str(steps), "train_seconds": f"{seconds:.1f}"})


def train_run(arm: str, seed: int, args: argparse.Namespace, run_dir: Path) -> float:
    """Train one (arm, seed) in a child process; returns its wall seconds (recorded, if trained before)."""
    timing = run_dir.with_suffix(".seconds")
    if (run_dir / WEIGHTS).is_file():
        return float(timing.read_text()) if timing.is_file() else float("nan")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    common = [f"data.root={args.data}", "data.source=folder", f"run.seed={seed}", *args.overrides]
    if ARMS[arm] is None:
        command = [sys.executable, __file__, "--classic-child", str(run_dir), "--steps", str(args.steps)]
        command += ["--classic-workers", str(args.classic_workers), "--snapshots", *map(str, args.snapshots)]
        command += ["--config", args.config, *common]
    else:
        command = [sys.executable, str(REPO / "trainer" / "train.py"), "--config", args.config, *common, *ARMS[arm]]
        command += [
            f"run.dir={run_dir}",
            f"train.max_steps={args.steps}",
            "data.num_workers=0",
            "log.tracker=none",
            "eval.every_epochs=null",
            "eval.every_steps=null",
            "ckpt.keep=100",  # the snapshots' checkpoints, copied out below
            f"ckpt.every_steps={math.gcd(args.steps, *args.snapshots)}",
            f"log.sample_every_steps={args.steps}",
        ]
    start = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w") as log:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{arm} seed {seed} failed (exit {proc.returncode}); see {run_dir.with_suffix('.log')}")
    seconds = time.perf_counter() - start
    if ARMS[arm] is not None:  # the trainer's checkpoints -> snapshots (G only), then drop the checkpoints
        for step in args.snapshots:
            if step != args.steps:
                snapshot_path(run_dir, step).parent.mkdir(exist_ok=True)
                checkpoint = run_dir / "checkpoints" / f"step-{step:08d}"
                shutil.copy(checkpoint / "model.safetensors", snapshot_path(run_dir, step))
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    timing.write_text(f"{seconds:.1f}\n")
    return seconds


def real_diversity(cfg: Config, count: int = 1000) -> float:
    """`pixel_diversity` of `count` reference images (data.root) at the model's resolution."""
    from trainer.monitor.diversity import pixel_diversity
    from trainer.quality.fid import reference_dataset

    dataset = reference_dataset(cfg)
    picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:count]
    return pixel_diversity(torch.stack([dataset[int(i)] for i in picks]))


def measure(
    cfg: Config, runs: dict[tuple[str, int], Path], modes: list[str], device: str, steps: int, snapshots: list[int]
) -> dict[tuple[str, int, str, int], dict]:
    """Every run's generator at each snapshot step and at the end, in each BatchNorm mode."""
    from accelerate import Accelerator

    from trainer.monitor.diversity import pixel_diversity
    from trainer.quality.fid import Evaluator, latents
    from trainer.sample import generate

    evaluator = Evaluator(cfg, Accelerator(cpu=device == "cpu", mixed_precision="no"), print)
    real = real_diversity(cfg)
    z = latents(cfg.eval.seed, range(1000), cfg.model.nz)
    weights = Path(cfg.eval.feature_extractor_weights or "default")
    results = {}
    for (arm, seed), run_dir in runs.items():
        for step in sorted({*snapshots, steps}):
            generator = Generator(cfg.model.nz, cfg.model.ngf, cfg.model.resolution)
            generator.load_state_dict(
                load_file(str(run_dir / WEIGHTS if step == steps else snapshot_path(run_dir, step)))
            )
            at = "" if step == steps else f"-step{step}"
            for mode in modes:
                # Stored beside the run: an interrupted comparison does not measure it again.
                stored = run_dir / f"measured-{mode}-{cfg.eval.num_samples}-{weights.stem}{at}.json"
                if stored.is_file():
                    r = json.loads(stored.read_text())
                else:
                    r = evaluator.evaluate(generator.to(evaluator.acc.device).eval(), mode)
                    images = generate(generator, z, str(evaluator.acc.device), cfg.eval.batch_size, mode)
                    r["diversity"] = pixel_diversity(images) / real
                    stored.write_text(json.dumps(r))
                results[(arm, seed, mode, step)] = r
                print(
                    f"{arm:14} seed {seed} {mode:7} step {step:6}: FID {r['fid']:8.2f}  score {r['is_mean']:.2f}  "
                    f"diversity {r['diversity']:.2f}  ({r['eval_s']:.0f}s)",
                    flush=True,
                )
    return results


def table(results: dict[tuple[str, int, str, int], dict], steps: int, seconds: dict[tuple[str, int], float]) -> str:
    """The protocol's table (each run's generator at `steps`), then, with snapshots from half the run on,
    each run's mean over them."""
    text = _table({(a, s, m): r for (a, s, m, t), r in results.items() if t == steps}, steps, seconds)
    late = sorted({t for *_, t in results if t >= steps // 2})
    if len(late) > 1:
        mean = {}
        for a, s, m, t in results:
            if t == steps:
                rows = [results[(a, s, m, u)] for u in late]
                mean[(a, s, m)] = {k: statistics.mean(r[k] for r in rows) for k in ("fid", "is_mean", "diversity")}
        steps_text = ", ".join(map(str, late))
        text += f"\nEach run's mean over its generators at steps {steps_text}:\n\n" + _table(mean, steps, seconds)
    return text


def _table(results: dict[tuple[str, int, str], dict], steps: int, seconds: dict[tuple[str, int], float]) -> str:
    lines = [
        "| arm | BN stats | steps | seeds | FID (classifier) per seed | mean ± sd | classifier score mean | diversity mean | train s/run |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    keys = sorted({(a, m) for a, _, m in results}, key=lambda k: (list(ARMS).index(k[0]), k[1]))
    for arm, mode in keys:
        rows = sorted((s, r) for (a, s, m), r in results.items() if a == arm and m == mode)
        fids = [r["fid"] for _, r in rows]
        sd = statistics.stdev(fids) if len(fids) > 1 else float("nan")
        times = [seconds[(arm, s)] for s, _ in rows if seconds.get((arm, s)) == seconds.get((arm, s))]  # not NaN
        per_seed = ", ".join(f"s{s}: {r['fid']:.1f}" for s, r in rows)
        lines.append(
            f"| {arm} | {mode} | {steps} | {len(rows)} | {per_seed} | {statistics.mean(fids):.1f} ± {sd:.1f} | "
            f"{statistics.mean(r['is_mean'] for _, r in rows):.2f} | {statistics.mean(r['diversity'] for _, r in rows):.2f} | "
            f"{statistics.mean(times) if times else float('nan'):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "dcgan_cifar10.yaml"))
    parser.add_argument("--data", help="training images (an ImageFolder tree, e.g. <cifar10-jpg>/train)")
    parser.add_argument("--reference", help="images to measure against (e.g. <cifar10-jpg>/test)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=["classic", "ours"], choices=list(ARMS))
    parser.add_argument("--num-samples", type=int, default=10000, help="generated images per measurement")
    parser.add_argument("--bn-stats", choices=("running", "batch", "both"), default="both")
    parser.add_argument("--weights", help="classifier weights (default: the cached default recipe)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training and for measuring")
    parser.add_argument("--parallel", type=int, default=1, help="trainings at once (default 1)")
    parser.add_argument("--classic-workers", type=int, default=0, help="DataLoader workers of the classic loop")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to measure")
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument(
        "--snapshots", type=int, nargs="*", default=[], help="also keep and measure G at these steps, e.g. 1000 1500"
    )
    parser.add_argument("--no-measure", action="store_true", help="train only (measure with a later call)")
    parser.add_argument("--classic-child", type=Path, help=argparse.SUPPRESS)  # internal: train one classic run
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every arm")
    args = parser.parse_intermixed_args(argv)
    torch.set_num_threads(args.threads)
    if args.classic_child:
        cfg = load_config(args.config, args.overrides)
        train_classic(cfg, args.steps, args.classic_child, args.classic_workers, args.snapshots)
        return 0
    if not args.data or not args.reference:
        parser.error("--data and --reference are required")

    runs = {(arm, seed): (args.out / f"{arm}-s{seed}").resolve() for seed in args.seeds for arm in args.arms}

    def train(key: tuple[str, int]) -> float:
        seconds = train_run(*key, args, runs[key])
        print(f"trained {key[0]} seed {key[1]}: {seconds:.0f}s", flush=True)
        return seconds

    # Seed-major: a partial comparison already has every arm. Each training is its own process.
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        seconds = dict(zip(runs, pool.map(train, runs), strict=True))
    if args.no_measure:
        return 0

    eval_overrides = [
        "data.source=folder",
        f"data.root={args.reference}",
        "eval.split=train",  # "train" here means: the images under data.root, i.e. --reference
        f"eval.feature_extractor={CLASSIFIER}",
        f"eval.num_samples={args.num_samples}",
        *([f"eval.feature_extractor_weights={args.weights}"] if args.weights else []),
    ]
    cfg = load_config(args.config, [*args.overrides, *eval_overrides])
    modes = ["running", "batch"] if args.bn_stats == "both" else [args.bn_stats]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    results = measure(cfg, runs, modes, device, args.steps, args.snapshots)
    text = table(results, args.steps, seconds)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"quality-{args.steps}steps.md").write_text(text)
    records = [{"arm": a, "seed": s, "bn_stats": m, "steps": t, **r} for (a, s, m, t), r in results.items()]
    (args.out / f"quality-{args.steps}steps.json").write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
