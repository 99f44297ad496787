"""The training loop: epochs and steps, and when to log, sample, checkpoint and stop.

Reads top to bottom: build everything, resume, loop, finish. The GAN maths is in `step.py`;
saving and loading in `checkpoint.py`; output files in `snapshots.py`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from trainer.checkpoint import Checkpointer, TrainState
from trainer.config import Config, to_yaml
from trainer.console import Console, format_duration
from trainer.data import build_dataloader, build_dataset, to_model_input
from trainer.errors import DivergenceError
from trainer.models import build_models
from trainer.runtime import build_accelerator, check_against_hardware
from trainer.snapshots import export_weights, fixed_noise, save_generator_grid, save_real_grid
from trainer.step import GANStep
from trainer.stopping import StopRequest


@dataclass
class RunSummary:
    run_dir: Path
    step: int
    total_steps: int
    epoch: int
    stopped_early: bool
    stop_reason: str | None
    wall_time_s: float
    images_per_s: float
    last_metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None


class MetricMeter:
    """Sums metric tensors on the device between log steps; `mean` is the only host sync."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.count += 1

    def mean_across_ranks(self, accelerator: Accelerator) -> dict[str, float]:
        if not self.count:
            return {}
        names = list(self.sums)
        local = torch.stack([self.sums[n].float() for n in names]) / self.count
        values = accelerator.reduce(local, reduction="mean").tolist()
        self.sums, self.count = {}, 0
        return dict(zip(names, values, strict=True))


def _check_finite(metrics: dict[str, float], step: int, checkpoint: Path | None) -> None:
    bad = [name for name in ("loss_D", "loss_G") if name in metrics and not math.isfinite(metrics[name])]
    if bad:
        network = "discriminator" if bad[0] == "loss_D" else "generator"
        raise DivergenceError(
            f"{bad[0]} is {metrics[bad[0]]} by step {step}: the {network} diverged. "
            f"Newest checkpoint: {checkpoint or 'none'}. Lower train.lr or use train.mixed_precision=no, "
            "then resume with run.resume=<that checkpoint> or start a new run.dir"
        )


def append_metrics(path: Path, state: TrainState, metrics: dict[str, float], images_per_s: float) -> None:
    """One JSON line per log step: a local record of the run that needs no tracker."""
    record = {
        "step": state.step,
        "epoch": state.epoch,
        "images_seen": state.images_seen,
        "images_per_s": images_per_s,
        **metrics,
    }
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def train(cfg: Config) -> RunSummary:
    accelerator = build_accelerator(cfg)
    use_sync_bn = check_against_hardware(cfg, accelerator)
    console = Console(accelerator)
    run_dir = Path(cfg.run.dir)
    console.config(to_yaml(cfg))

    checkpointer = Checkpointer(run_dir, accelerator, cfg.ckpt.keep)
    resume_from = checkpointer.find_resume_point(cfg.run.resume, cfg)  # fails before anything is written
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    with accelerator.main_process_first():  # a CIFAR-10 download happens once, on the main process
        dataset = build_dataset(cfg.data, cfg.model.resolution, cfg.run.seed)
    loader = build_dataloader(dataset, cfg.train.batch_size, cfg.data.num_workers)
    generator, discriminator = build_models(cfg.model, cfg.run.seed, use_sync_bn)
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    # Order matters: Accelerate saves them as model (G) / model_1 (D), optimizer / optimizer_1.
    generator, discriminator, opt_g, opt_d, loader = accelerator.prepare(generator, discriminator, opt_g, opt_d, loader)
    unwrapped_g = accelerator.unwrap_model(generator)

    state = TrainState(global_batch=cfg.train.batch_size)
    if resume_from is not None:
        state = checkpointer.load(resume_from)
        console.print(
            f"resumed from {resume_from} (step {state.step}, epoch {state.epoch}, {state.step_in_epoch} steps into it)"
        )
    steps_per_epoch = len(loader)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    console.print(
        f"{len(dataset)} images, {steps_per_epoch} steps/epoch of {cfg.train.batch_size} images "
        f"({cfg.train.batch_size // accelerator.num_processes} per process x {accelerator.num_processes}), "
        f"{total_steps} steps in all; device {accelerator.device}, precision {cfg.train.mixed_precision}, "
        f"{'SyncBatchNorm' if use_sync_bn else 'BatchNorm'}"
    )

    samples_dir = run_dir / "samples"
    grid_noise = fixed_noise(cfg.log.sample_grid_size, cfg.model.nz, cfg.run.seed)
    if accelerator.is_main_process and not (samples_dir / "real.png").exists():
        # A seeded random pick: the first files of a sorted folder would all be one class.
        picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.run.seed))
        real_images = [dataset[int(i)] for i in picks[: cfg.log.sample_grid_size]]
        save_real_grid(torch.stack(real_images), samples_dir / "real.png")

    gan_step = GANStep(accelerator, generator, discriminator, opt_g, opt_d, cfg.model.nz, cfg.run.seed)
    stop = StopRequest(run_dir, accelerator)
    meter = MetricMeter()
    last_metrics: dict[str, float] = {}
    start_step, start_time = state.step, time.perf_counter()
    window_step, window_time = state.step, start_time

    def sample(name: str) -> None:
        if accelerator.is_main_process:
            save_generator_grid(unwrapped_g, grid_noise, samples_dir / name, accelerator.autocast)

    try:
        while state.step < total_steps and not stop.agreed:
            loader.set_epoch(state.epoch)  # the epoch's shuffle: same on every rank, from run.seed + epoch
            batches = accelerator.skip_first_batches(loader, state.step_in_epoch) if state.step_in_epoch else loader
            for real in batches:
                metrics = gan_step(to_model_input(real), state.step)
                state.step += 1
                state.step_in_epoch += 1
                if accelerator.scaler is not None:  # fp16: the scaler skips steps whose gradients overflowed
                    state.skipped_steps_d += int(opt_d.step_was_skipped)
                    state.skipped_steps_g += int(opt_g.step_was_skipped)
                meter.add(metrics)
                epoch_done = state.step_in_epoch == steps_per_epoch
                if epoch_done:
                    state.epoch += 1
                    state.step_in_epoch = 0

                if state.step % cfg.log.every_steps == 0 or state.step == total_steps:
                    last_metrics = meter.mean_across_ranks(accelerator)
                    now = time.perf_counter()
                    images_per_s = (state.step - window_step) * cfg.train.batch_size / max(now - window_time, 1e-9)
                    eta = (total_steps - state.step) * (now - window_time) / max(state.step - window_step, 1)
                    window_step, window_time = state.step, now
                    if accelerator.is_main_process:
                        append_metrics(run_dir / "metrics.jsonl", state, last_metrics, images_per_s)
                    _check_finite(last_metrics, state.step, checkpointer.newest())
                    console.print(
                        f"step {state.step}/{total_steps} epoch {state.epoch} | "
                        + " ".join(f"{k} {v:.4f}" for k, v in last_metrics.items())
                        + f" | {images_per_s:.0f} img/s | eta {format_duration(eta)}"
                    )
                if state.step % cfg.log.sample_every_steps == 0:
                    sample(f"step_{state.step:08d}.png")
                if epoch_done:
                    sample(f"epoch_{state.epoch:03d}.png")
                if state.step % cfg.ckpt.every_steps == 0 or epoch_done:
                    checkpointer.save(state, cfg)
                if state.step >= total_steps or stop.should_stop(state.step):
                    break
    finally:
        stop.close()

    final_checkpoint = checkpointer.save(state, cfg)  # no-op if this step is saved already
    if accelerator.is_main_process:
        if state.step % cfg.log.sample_every_steps and state.step_in_epoch:
            sample(f"step_{state.step:08d}.png")
        export_weights(unwrapped_g, run_dir / "generator.safetensors", cfg.model, state.step)
        export_weights(
            accelerator.unwrap_model(discriminator), run_dir / "discriminator.safetensors", cfg.model, state.step
        )
    elapsed = time.perf_counter() - start_time
    accelerator.wait_for_everyone()
    summary = RunSummary(
        run_dir=run_dir,
        step=state.step,
        total_steps=total_steps,
        epoch=state.epoch,
        stopped_early=state.step < total_steps,
        stop_reason=stop.reason,
        wall_time_s=elapsed,
        images_per_s=(state.step - start_step) * cfg.train.batch_size / max(elapsed, 1e-9),
        last_metrics=last_metrics,
        checkpoint=final_checkpoint,
    )
    console.print(
        f"{'stopped' if summary.stopped_early else 'finished'} at step {state.step}/{total_steps}"
        + (f" ({stop.reason}); run the same command to resume" if summary.stopped_early else "")
        + f" | {format_duration(elapsed)}, {summary.images_per_s:.0f} img/s | checkpoint {final_checkpoint} | "
        f"samples {samples_dir} | weights {run_dir / 'generator.safetensors'}"
    )
    accelerator.end_training()  # last: it also tears down the process group
    return summary
