"""`python -m trainer.bench`: training throughput of this trainer against the classic DCGAN loop.

Both run on the same data, on the same machine, in one invocation, each in its own process (so
peak memory is each one's own):

- ours: the trainer's training step and data path (packed data, on-device resize, channels_last,
  AMP, fused Adam on CUDA, the GAN step of trainer/core/step.py, the EMA if configured), built by the
  same `build_training` (trainer/core/training.py) as a training run, but not the rest of the loop: no metric averaging, health checks, logging, grids or
  checkpoints (a training run's metrics.jsonl gives the whole loop's images/s);
- reference: the PyTorch DCGAN example written the classic way: PIL transforms in a DataLoader
  with 2 workers, fp32, eager, Sigmoid + BCELoss, D's gradients computed in the G step.

Both run with `cudnn.benchmark = True` (the example sets it; the trainer sets it on CUDA) and torch's
default TF32 settings, so on Ampere and later GPUs the classic loop's fp32 convolutions are TF32;
each result records its precision, cudnn.benchmark and TF32 settings.

Each measures steady-state images/s after warm-up steps (the first steps pay for allocation and
kernel selection). On CUDA it also reports ms/step, the model FLOPs per step (counted with
torch.utils.flop_counter) and the fraction of this GPU's measured bf16 matmul throughput reached.

    python -m trainer.bench --config configs/dcgan_cifar10.yaml data.source=folder data.root=data/cifar10-jpg/train
    python -m trainer.bench --ablate ...   # also ours with each optimisation turned off in turn
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trainer.core.config import Config, load_config, program_name

# What --ablate turns off, one at a time: each must show its worth in the table.
ABLATIONS = {
    "bf16 autocast": ["train.mixed_precision=no"],
    "channels_last": ["train.channels_last=false"],
    "packed data + on-device resize": ["data.packed=false"],
}


@dataclass
class Result:
    name: str
    images_per_s: float
    ms_per_step: float
    peak_memory_mb: float
    memory_kind: str
    steps: int
    flops_per_step: float | None = None
    precision: str = "no"
    cudnn_benchmark: bool = False
    tf32_convolutions: bool = False
    tf32_matmul: bool = False


def _settings(precision: str) -> dict:
    """The numerics a result was measured under, read when it was measured."""
    return {
        "precision": precision,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32_convolutions": torch.backends.cudnn.allow_tf32,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return rss / 1024, "peak RSS (process + loader workers)"


def _time_steps(step_fn, batches, device: torch.device, warmup: int, steps: int) -> tuple[float, float | None]:
    """Seconds for `steps` steps after `warmup`; FLOPs of one step on CUDA."""
    iterator = iter(batches)

    def next_batch():
        nonlocal iterator
        try:
            return next(iterator)
        except StopIteration:
            iterator = iter(batches)
            return next(iterator)

    flops = None
    for i in range(warmup):
        if i == warmup - 1 and device.type == "cuda":
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                step_fn(next_batch(), i)
            flops = float(counter.get_total_flops())
        else:
            step_fn(next_batch(), i)
    _sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step_fn(next_batch(), warmup + i)
    _sync(device)
    return time.perf_counter() - start, flops


def run_ours(cfg: Config, warmup: int, steps: int) -> Result:
    from trainer.core.data import load_dataset
    from trainer.core.runtime import build_accelerator, check_against_hardware
    from trainer.core.training import build_training

    accelerator = build_accelerator(cfg)
    use_sync_bn = check_against_hardware(cfg, accelerator)
    dataset = load_dataset(cfg.data, cfg.model.resolution, cfg.run.seed)
    training = build_training(cfg, accelerator, use_sync_bn, dataset)  # exactly what the training loop builds

    def step(batch: torch.Tensor, i: int) -> None:
        training.step(batch, i)

    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    seconds, flops = _time_steps(step, training.loader, accelerator.device, warmup, steps)
    peak, kind = _peak_memory(accelerator.device)
    rate = steps * cfg.train.batch_size / seconds
    return Result(
        "ours", rate, 1000 * seconds / steps, peak, kind, steps, flops, **_settings(accelerator.mixed_precision)
    )


def _reference_dataset(cfg: Config):
    """The classic example's datasets and transforms (torchvision's CIFAR10, ImageFolder, ...: the
    source's `classic` in trainer/core/data.py), on the same images as ours."""
    import torchvision.transforms as T

    from trainer.core.data import SOURCES

    transform = T.Compose(
        [
            T.Resize(cfg.model.resolution),
            T.CenterCrop(cfg.model.resolution),
            T.ToTensor(),
            T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )
    return SOURCES[cfg.data.source].classic(cfg.data, cfg.model.resolution, cfg.run.seed, transform)


def build_reference(cfg: Config, num_workers: int = 2):
    """The PyTorch DCGAN example's loop (examples/dcgan/main.py), kept as it is written there.

    Returns (step(batch, i) -> dict of float losses, its DataLoader, netG, device); shared with
    docs/compare_quality.py, which trains it to the end. `num_workers` changes no numbers (the
    shuffle order comes from the main process's RNG).
    """
    import torch.nn as nn
    import torch.optim as optim

    from trainer.core.models import Discriminator, Generator, init_weights

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True  # as examples/dcgan/main.py sets it
    torch.manual_seed(cfg.run.seed)
    dataloader = torch.utils.data.DataLoader(
        _reference_dataset(cfg), batch_size=cfg.train.batch_size, shuffle=True, num_workers=num_workers, drop_last=True
    )
    netG = Generator(cfg.model.nz, cfg.model.ngf, cfg.model.resolution).to(device)
    netG.apply(init_weights)
    netD = nn.Sequential(Discriminator(cfg.model.ndf, cfg.model.resolution), nn.Sigmoid()).to(device)
    netD.apply(init_weights)
    criterion = nn.BCELoss()
    optimizerD = optim.Adam(netD.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    optimizerG = optim.Adam(netG.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    real_label, fake_label = 1.0, 0.0

    def step(data, i: int) -> dict[str, torch.Tensor]:
        netD.zero_grad()
        real_cpu = data[0].to(device)
        batch_size = real_cpu.size(0)
        label = torch.full((batch_size,), real_label, dtype=real_cpu.dtype, device=device)
        output = netD(real_cpu).view(-1)
        errD_real = criterion(output, label)
        errD_real.backward()
        noise = torch.randn(batch_size, cfg.model.nz, 1, 1, device=device)
        fake = netG(noise)
        label.fill_(fake_label)
        output = netD(fake.detach()).view(-1)
        errD_fake = criterion(output, label)
        errD_fake.backward()
        optimizerD.step()
        netG.zero_grad()
        label.fill_(real_label)
        output = netD(fake).view(-1)
        errG = criterion(output, label)
        errG.backward()
        optimizerG.step()
        return {"loss_D": (errD_real + errD_fake).detach(), "loss_G": errG.detach()}

    return step, dataloader, netG, device


def run_reference(cfg: Config, warmup: int, steps: int) -> Result:
    step, dataloader, _, device = build_reference(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, flops = _time_steps(step, dataloader, device, warmup, steps)
    peak, kind = _peak_memory(device)
    rate = steps * cfg.train.batch_size / seconds
    return Result("reference", rate, 1000 * seconds / steps, peak, kind, steps, flops, **_settings("no"))


def measure_bf16_matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def _child(kind: str, config_file: str | None, overrides: list[str], warmup: int, steps: int, queue) -> None:
    try:
        cfg = load_config(config_file, overrides)
        result = (run_ours if kind == "ours" else run_reference)(cfg, warmup, steps)
        queue.put(asdict(result))
    except BaseException as exc:  # report, do not hang the parent
        queue.put({"error": f"{kind}: {type(exc).__name__}: {exc}"})


def _in_child(kind: str, config_file: str | None, overrides: list[str], warmup: int, steps: int) -> Result:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, config_file, overrides, warmup, steps, queue))
    proc.start()
    out = queue.get()
    proc.join()
    if "error" in out:
        raise SystemExit(f"error: {out['error']}")
    return Result(**out)


def _cpu_name() -> str:
    try:
        model = next(line for line in open("/proc/cpuinfo") if line.startswith("model name"))
        return f"{model.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=program_name("dcgan-bench", "python -m trainer.bench"), description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", help="YAML config (default: the classic recipe)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--steps", type=int, default=30, help="measured steps (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="steps before measuring (default 5)")
    parser.add_argument("--ablate", action="store_true", help="also run ours with each optimisation off")
    parser.add_argument("--no-reference", action="store_true", help="skip the classic loop")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)  # validate before spending minutes

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    print(
        f"machine: {name}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, python {sys.version.split()[0]}"
    )
    print(
        f"config: {args.config or 'defaults'} {' '.join(args.overrides)} | global batch {cfg.train.batch_size}, "
        f"{cfg.model.resolution}x{cfg.model.resolution}, {args.warmup} warm-up + {args.steps} measured steps"
    )

    runs: list[tuple[str, list[str]]] = [("ours", [])]
    if args.ablate:
        runs += [(f"ours without {label}", extra) for label, extra in ABLATIONS.items()]
    results: list[Result] = []
    for label, extra in runs:
        result = _in_child("ours", args.config, [*args.overrides, *extra], args.warmup, args.steps)
        result.name = label
        results.append(result)
    if not args.no_reference:
        results.append(_in_child("reference", args.config, args.overrides, args.warmup, args.steps))

    peak_tflops = measure_bf16_matmul_tflops(device) if device.type == "cuda" else None
    reference = next((r for r in results if r.name == "reference"), None)
    print(
        f"{'':36} {'images/s':>10} {'ms/step':>9} {'peak MB':>9} {'vs reference':>13}"
        + ("  roofline" if peak_tflops else "")
    )
    for r in results:
        ratio = f"{r.images_per_s / reference.images_per_s:.2f}x" if reference else "-"
        line = f"{r.name:36} {r.images_per_s:10.1f} {r.ms_per_step:9.1f} {r.peak_memory_mb:9.0f} {ratio:>13}"
        if peak_tflops and r.flops_per_step:
            achieved = r.flops_per_step / (r.ms_per_step / 1000) / 1e12
            line += f"  {achieved:.1f} TFLOP/s = {achieved / peak_tflops:.1%} of {peak_tflops:.0f} (bf16 matmul)"
        print(line)
    print(f"memory: {results[0].memory_kind}")
    for r in results:
        print(
            f"{r.name}: precision {r.precision}, cudnn.benchmark {r.cudnn_benchmark}"
            + (
                f", TF32 convolutions {r.tf32_convolutions}, TF32 matmul {r.tf32_matmul}"
                if device.type == "cuda"
                else ""
            )
        )
    print("ours: the GAN step and data path only (no logging, health checks or checkpoints); see the module docstring")
    if args.json:
        args.json.write_text(json.dumps({"results": [asdict(r) for r in results], "bf16_matmul_tflops": peak_tflops}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
