"""The training loop: epochs and steps, and when to log, sample, checkpoint and stop.

Reads top to bottom: build everything, resume, loop, finish. The GAN maths is in `core/step.py`;
saving and loading in `core/checkpoint.py`; what watches the run in `monitor/`; FID in `quality/`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from trainer.core.checkpoint import EMA_FILE, Checkpointer, TrainState, export_weights
from trainer.core.config import Config, evaluation_enabled, to_dict, to_yaml
from trainer.core.data import build_dataloader, open_dataset, to_model_input
from trainer.core.ema import GeneratorEMA
from trainer.core.models import build_networks
from trainer.core.runtime import build_accelerator, check_against_hardware
from trainer.core.step import GANStep
from trainer.monitor.console import Console, RunSummary, format_duration
from trainer.monitor.diversity import CollapseWatch
from trainer.monitor.grids import fixed_noise, generate_grid, save_generator_grid, save_real_grid
from trainer.monitor.health import NonFinite, NonFiniteWatch
from trainer.monitor.measurements import MetricMeter, append_metrics, host_metrics
from trainer.monitor.run_lock import RunLock
from trainer.monitor.stopping import StopRequest, exit_with_launcher
from trainer.monitor.tracking import Tracker, TrackerChoice, choose_tracker
from trainer.prepare import prepare_before_launch
from trainer.quality.fid import Evaluator
from trainer.util.atomic import write_text_atomic
from trainer.util.errors import DivergenceError, RunError
from trainer.util.ranks import main_decides, one_process_first


@contextmanager
def _stop_if_write_fails(what: str, path: Path, checkpointer: Checkpointer) -> Iterator[None]:
    """A full disk (or any write error) on run outputs stops the run with one clear line."""
    try:
        yield
    except OSError as exc:
        newest = checkpointer.newest()
        raise RunError(
            f"could not write the {what} ({path}: {exc.strerror or exc}); checkpoints are intact "
            f"(newest: {newest.name if newest else 'none'}). Free space, then run the same command to resume"
        ) from None


def train(cfg: Config) -> RunSummary:
    """One training run. Before anything else, the main process takes the run directory's lock, and
    the run's one-time preparation happens before the process group exists (see trainer.prepare)."""
    run_dir = Path(cfg.run.dir)
    tracking = choose_tracker(cfg)  # W&B online without credentials fails here, before anything is written
    lock = RunLock(run_dir)
    took_over = one_process_first(lambda: _take(lock), name="run-lock")  # only the main process holds it
    try:
        exit_with_launcher(on_exit=lock.release)
        prepared = prepare_before_launch(cfg)
        return _train(cfg, run_dir, tracking, prepared, took_over)
    finally:
        lock.release()  # a no-op on processes that do not hold it


def _take(lock: RunLock) -> str | None:
    lock.acquire()
    return lock.took_over.describe() if lock.took_over else None


def _train(
    cfg: Config, run_dir: Path, tracking: TrackerChoice, prepared: dict[str, Any], took_over: str | None
) -> RunSummary:
    accelerator = build_accelerator(cfg, tracking.accelerator_kwargs)
    use_sync_bn = check_against_hardware(cfg, accelerator)
    console = Console(accelerator)
    if took_over:
        console.print(f"warning: took over the run lock of a run that is gone ({took_over})")
    tracker = Tracker(cfg, tracking, accelerator, console)
    console.config(to_dict(cfg), str(run_dir / "config.yaml"))

    checkpointer = Checkpointer(run_dir, accelerator, cfg.ckpt.keep)
    resume_from = checkpointer.find_resume_point(cfg.run.resume, cfg)  # fails before anything is written
    evaluator = Evaluator(cfg, accelerator, console.print) if evaluation_enabled(cfg) else None  # so does this
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))

    dataset = open_dataset(cfg.data, cfg.model.resolution, cfg.run.seed, prepared["data"])
    loader = build_dataloader(dataset, cfg.train.batch_size, cfg.data.num_workers)
    generator, discriminator, opt_g, opt_d = build_networks(cfg, accelerator, use_sync_bn)
    ema = GeneratorEMA(generator, cfg.train.ema_decay, accelerator) if cfg.train.ema_decay else None
    # Order matters: Accelerate saves them as model (G) / model_1 (D), optimizer / optimizer_1.
    generator, discriminator, opt_g, opt_d, loader = accelerator.prepare(generator, discriminator, opt_g, opt_d, loader)
    # the plain modules: DDP, compile and autocast wrappers stay on the training path only
    unwrapped_g = accelerator.unwrap_model(generator, keep_torch_compile=False)
    shown_g = ema.module if ema else unwrapped_g  # the generator that grids and evaluations show

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
        f"{total_steps} steps in all; device {accelerator.device}, precision {accelerator.mixed_precision}, "
        f"{'SyncBatchNorm' if use_sync_bn else 'BatchNorm'}"
    )

    samples_dir = run_dir / "samples"
    grid_noise = fixed_noise(cfg.log.sample_grid_size, cfg.model.nz, cfg.run.seed)
    if accelerator.is_main_process:
        # A seeded random pick: the first files of a sorted folder would all be one class.
        picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.run.seed))
        real_grid = torch.stack([dataset[int(i)] for i in picks[: cfg.log.sample_grid_size]])
        real_grid = to_model_input(real_grid, cfg.model.resolution)
        if not (samples_dir / "real.png").exists():
            save_real_grid(real_grid, samples_dir / "real.png")
        collapse = CollapseWatch(real_grid, console.print)  # the fixed-noise grid's diversity, vs these
    # Resuming this run's own checkpoint continues its W&B run; a checkpoint of another run starts a new one.
    continuing = resume_from is not None and resume_from.resolve().parent == checkpointer.dir.resolve()
    state.tracker_run_id = tracker.start(cfg, state, continuing, samples_dir / "real.png")  # saved in checkpoints

    cuda_graphs = cfg.train.compile and cfg.train.compile_mode != "default" and accelerator.device.type == "cuda"
    gan_step = GANStep(accelerator, generator, discriminator, opt_g, opt_d, cfg.model.nz, cfg.run.seed, cuda_graphs)
    state.precision = accelerator.mixed_precision

    def sync_skip_counts(to_state: bool) -> None:
        """fp16 skips are counted on the device by the step; the state holds them for logs and checkpoints."""
        if to_state:
            state.skipped_steps_d, state.skipped_steps_g = gan_step.skipped.tolist()
        else:
            gan_step.skipped.copy_(torch.tensor([state.skipped_steps_d, state.skipped_steps_g]))

    sync_skip_counts(to_state=False)
    stop = StopRequest(run_dir, accelerator)
    watch = NonFiniteWatch(accelerator, {"generator": generator, "discriminator": discriminator})
    meter = MetricMeter()
    last_metrics: dict[str, float] = {}
    start_step, start_time = state.step, time.perf_counter()
    window_step, window_time = state.step, start_time

    def sample(name: str) -> None:
        if accelerator.is_main_process:
            with _stop_if_write_fails("sample grid", samples_dir / name, checkpointer):
                save_generator_grid(shown_g, grid_noise, samples_dir / name, accelerator.autocast)
            caption = f"step {state.step}, {state.images_seen} images seen"
            tracker.log_image("fixed_noise", samples_dir / name, state, caption)

    def evaluate() -> float:
        """FID / IS / KID of the shown generator (collective); keeps the best checkpoint. Returns seconds taken."""
        results = evaluator.evaluate(shown_g)
        weights = "ema" if ema else "raw"
        kept = checkpointer.keep_if_best(
            state, cfg, results["fid"], {"weights": weights, "num_samples": results["num_samples"]}
        )
        scores = {k: results[k] for k in ("fid", "is_mean", "is_std", "kid_mean", "kid_std")}
        if accelerator.is_main_process:
            with _stop_if_write_fails("metrics", run_dir / "metrics.jsonl", checkpointer):
                record = {**scores, "eval_weights": weights, "eval_num_samples": results["num_samples"]}
                append_metrics(run_dir / "metrics.jsonl", state, {**record, "eval_s": results["eval_s"]}, None)
            tracker.log_metrics(scores, state)
            if kept:
                tracker.log_best(checkpointer.dir)  # W&B summary best/*, and the best artifact if asked
        console.print(
            f"eval step {state.step} epoch {state.epoch} | FID {scores['fid']:.3f} | "
            f"IS {scores['is_mean']:.3f} ± {scores['is_std']:.3f} | KID {scores['kid_mean']:.5f} ± "
            f"{scores['kid_std']:.5f} | {results['num_samples']} samples, {weights} generator, "
            f"{results['eval_s']:.0f}s" + (" | best so far: checkpoint kept" if kept else "")
        )
        return results["eval_s"]

    def recover(problem: NonFinite) -> None:
        """Reload the newest checkpoint (train.on_nonfinite=rollback) or stop with DivergenceError."""
        newest = main_decides(accelerator, checkpointer.newest)  # one rollback target for every rank
        where = f"{problem.network} stopped producing finite values at step {problem.step}"
        if cfg.train.on_nonfinite == "rollback" and newest is not None and state.rollbacks < cfg.train.max_rollbacks:
            attempt = state.rollbacks + 1
            restored = checkpointer.load(newest)
            vars(state).update(vars(restored), rollbacks=attempt)
            sync_skip_counts(to_state=False)
            watch.reset()
            meter.reset()
            console.print(
                f"warning: the {where}; rolled back to {newest} (rollback {attempt} of "
                f"{cfg.train.max_rollbacks}), replaying with new noise"
            )
            return
        advice = (
            "train.max_rollbacks is used up"
            if cfg.train.on_nonfinite == "rollback"
            else "set train.on_nonfinite=rollback to reload the newest checkpoint automatically"
        )
        raise DivergenceError(
            f"the {where}. Newest checkpoint: {newest or 'none'} (it is healthy: checkpoints are checked "
            f"before they are written). Lower train.lr or use train.mixed_precision=no, or {advice}; "
            "then run the same command to resume"
        )

    console.start_progress(state.step, total_steps, state.epoch)  # a live display on a terminal only
    try:
        while state.step < total_steps and not stop.agreed:
            loader.set_epoch(state.epoch)  # the epoch's shuffle: same on every rank, from run.seed + epoch
            batches = accelerator.skip_first_batches(loader, state.step_in_epoch) if state.step_in_epoch else loader
            for real in batches:
                metrics = gan_step(
                    to_model_input(real, cfg.model.resolution, cfg.train.channels_last), state.step, state.rollbacks
                )
                if ema:
                    ema.update(unwrapped_g)
                state.step += 1
                watch.update(metrics, state.step)
                state.step_in_epoch += 1
                meter.add(metrics)
                epoch_done = state.step_in_epoch == steps_per_epoch
                if epoch_done:
                    state.epoch += 1
                    state.step_in_epoch = 0
                console.advance(state.step, state.epoch)
                # A stop (signal or STOP file, agreed by all ranks) logs its last window and saves
                # through the same health check as any other checkpoint.
                stopping = state.step < total_steps and stop.should_stop(state.step)
                save_due = state.step % cfg.ckpt.every_steps == 0 or epoch_done or state.step >= total_steps or stopping
                problem = watch.check(state.step, before_save=save_due)
                if problem:
                    recover(problem)
                    break  # the outer loop restarts from the restored state
                if accelerator.scaler is not None and (save_due or state.step % cfg.log.every_steps == 0):
                    sync_skip_counts(to_state=True)  # fp16 only: a host sync, at log and save steps
                if stopping:
                    # Save before anything else: under torchrun, SIGTERM leaves 30 s until SIGKILL, so
                    # no evaluation and no upload may come between the signal and the checkpoint.
                    checkpointer.save(state, cfg)

                if state.step % cfg.log.every_steps == 0 or state.step == total_steps or stopping:
                    last_metrics = meter.mean_across_ranks(accelerator)
                    now = time.perf_counter()
                    images_per_s = (state.step - window_step) * cfg.train.batch_size / max(now - window_time, 1e-9)
                    eta = (total_steps - state.step) * (now - window_time) / max(state.step - window_step, 1)
                    window_step, window_time = state.step, now
                    if accelerator.is_main_process:
                        # + learning rates, fp16 loss scale and skipped steps, CUDA memory
                        record = {**last_metrics, **host_metrics(accelerator, {"G": opt_g, "D": opt_d}, state)}
                        grid = generate_grid(shown_g, grid_noise, accelerator.autocast)
                        record["diversity"] = collapse.observe(grid, state.step)  # warns on mode collapse
                        with _stop_if_write_fails("metrics", run_dir / "metrics.jsonl", checkpointer):
                            append_metrics(run_dir / "metrics.jsonl", state, record, images_per_s)
                        tracker.log_metrics({**record, "images_per_s": images_per_s}, state)
                    console.log_step(state.step, total_steps, state.epoch, last_metrics, images_per_s, eta)
                if state.step % cfg.log.sample_every_steps == 0:
                    sample(f"step_{state.step:08d}.png")
                if epoch_done:
                    sample(f"epoch_{state.epoch:03d}.png")
                if save_due:
                    checkpointer.save(state, cfg)
                if (
                    evaluator
                    and not stopping
                    and (
                        (cfg.eval.every_epochs and epoch_done and state.epoch % cfg.eval.every_epochs == 0)
                        or (cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0)
                        or state.step >= total_steps
                    )
                ):
                    window_time += evaluate()  # evaluation time does not count against images/s
                if state.step >= total_steps or stopping:
                    break
    finally:
        console.stop_progress()
        stop.close()

    final_checkpoint = checkpointer.save(state, cfg)  # no-op if this step is saved already
    if accelerator.is_main_process:
        if state.step % cfg.log.sample_every_steps and state.step_in_epoch:
            sample(f"step_{state.step:08d}.png")
        with _stop_if_write_fails("final weights", run_dir, checkpointer):
            export_weights(unwrapped_g, run_dir / "generator.safetensors", cfg.model, state.step)
            if ema:
                export_weights(ema.module, run_dir / EMA_FILE, cfg.model, state.step)
            export_weights(
                accelerator.unwrap_model(discriminator, keep_torch_compile=False),
                run_dir / "discriminator.safetensors",
                cfg.model,
                state.step,
            )
        tracker.log_weights(run_dir, state, final=state.step >= total_steps)  # log.wandb_artifacts=final|both
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
    # Finishes the tracker run (W&B prints its own summary) and tears down the process group:
    # nothing collective may follow, only rank 0's summary.
    tracker.finish()
    accelerator.end_training()
    console.print(
        f"{'stopped' if summary.stopped_early else 'finished'} at step {state.step}/{total_steps}"
        + (f" ({stop.reason}); run the same command to resume" if summary.stopped_early else "")
        + f" | {format_duration(elapsed)}, {summary.images_per_s:.0f} img/s | checkpoint {final_checkpoint} | "
        f"samples {samples_dir} | weights {run_dir / 'generator.safetensors'}"
    )
    console.summary(summary, tracker.summary())
    return summary
