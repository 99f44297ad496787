"""The training loop: epochs and steps, and when to log, sample, checkpoint and stop.

Reads top to bottom: build everything, resume, loop, finish. The GAN maths is in `core/step.py`;
saving and loading in `core/checkpoint.py`; what watches the run in `monitor/`; FID in `quality/`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch

from trainer.core.checkpoint import Checkpointer, TrainState
from trainer.core.config import Config, changed_keys, evaluation_enabled, to_yaml
from trainer.core.data import open_dataset, to_model_input
from trainer.core.runtime import build_accelerator, check_against_hardware
from trainer.core.training import build_training
from trainer.monitor import wandb_sink as sweep
from trainer.monitor.console import Console, RunSummary, format_duration
from trainer.monitor.diversity import CollapseWatch
from trainer.monitor.grids import fixed_noise, generate_grid, save_generator_grid, save_real_grid
from trainer.monitor.health import NonFinite, NonFiniteWatch
from trainer.monitor.measurements import MetricMeter, host_metrics, rewind_metrics
from trainer.monitor.run_lock import RunLock
from trainer.monitor.run_status import RunStatus
from trainer.monitor.stopping import StopRequest, exit_with_launcher, launch_started
from trainer.monitor.tracking import Tracker, TrackerChoice, choose_tracker
from trainer.prepare import prepare_before_launch
from trainer.quality.fid import Evaluator, score_label
from trainer.util.atomic import write_text_atomic
from trainer.util.errors import DivergenceError, RunError, UserError
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
    cfg = sweep.place(cfg, sweep.current_trial())  # a W&B sweep trial trains in <run.dir>/<its run id>
    run_dir = Path(cfg.run.dir)
    started = launch_started()  # a STOP file written after this is meant for this start
    tracking = choose_tracker(cfg)  # W&B online without credentials fails here, before anything is written
    lock = RunLock(run_dir)
    took_over = one_process_first(lambda: _take(lock), name="run-lock")  # only the main process holds it
    status = RunStatus(run_dir)
    try:
        exit_with_launcher(on_exit=lock.release)
        prepared = prepare_before_launch(cfg)
        return _train(cfg, run_dir, tracking, prepared, took_over, status, started)
    except (UserError, RunError) as exc:
        status.failed(exc.exit_code, str(exc))  # only once this start has said it is running
        raise
    finally:
        lock.release()  # a no-op on processes that do not hold it


def _take(lock: RunLock) -> str | None:
    lock.acquire()
    return lock.took_over.describe() if lock.took_over else None


def _train(
    cfg: Config,
    run_dir: Path,
    tracking: TrackerChoice,
    prepared: dict[str, Any],
    took_over: str | None,
    status: RunStatus,
    started: float,
) -> RunSummary:
    accelerator = build_accelerator(cfg, tracking.accelerator_kwargs)
    use_sync_bn = check_against_hardware(cfg, accelerator)
    console = Console(accelerator)
    if took_over:
        console.print(f"warning: took over the run lock of a run that is gone ({took_over})")
    tracker = Tracker(cfg, tracking, accelerator, console)
    console.config(changed_keys(cfg), str(run_dir / "config.yaml"))  # the rest is at its defaults

    checkpointer = Checkpointer(run_dir, accelerator, cfg.ckpt.keep)
    resume_from = checkpointer.find_resume_point(cfg.run.resume, cfg, use_sync_bn)  # fails before anything is written
    evaluator = Evaluator(cfg, accelerator, console.print) if evaluation_enabled(cfg) else None  # so does this
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))

    dataset = open_dataset(cfg.data, cfg.model.resolution, cfg.run.seed, prepared["data"])
    training = build_training(cfg, accelerator, use_sync_bn, dataset)  # what trainer.bench times, too
    generator, discriminator, opt_g, opt_d = training.generator, training.discriminator, training.opt_g, training.opt_d
    loader, ema, gan_step = training.loader, training.ema, training.gan_step
    shown_g = ema.module if ema else training.unwrapped_g  # the generator that grids and evaluations show

    def use_configured_optimizer_settings() -> None:
        """Adam's state brings back the lr and betas it was saved with; the config's apply (they differ only
        after a resume with run.resume_changes=allow, which the records then tell truly)."""
        for optimizer in (opt_g, opt_d):
            for group in optimizer.param_groups:
                group["lr"], group["betas"] = cfg.train.lr, tuple(cfg.train.betas)

    state = TrainState(global_batch=cfg.train.batch_size)
    if resume_from is not None:
        state = checkpointer.load(resume_from)
        use_configured_optimizer_settings()
        console.print(
            f"resumed from {resume_from} (step {state.step}, epoch {state.epoch}, {state.step_in_epoch} steps into it)"
            + (", its evaluation still due" if state.evaluation_due else "")
        )
        if state.num_processes is None:
            console.print(
                "note: the checkpoint was written by an earlier version, which drew each rank's noise from a seed of "
                "its own; the noise now comes from one seed per step for the whole batch, so training goes on "
                "along another (equally valid) path than that version's would have"
            )
        # metrics.jsonl: one row per step of the trajectory the checkpoints hold (the rows a killed run
        # wrote after this checkpoint are written again by this one)
        main_decides(
            accelerator,
            lambda: rewind_metrics(run_dir / "metrics.jsonl", state.step, redo_evaluation=state.evaluation_due),
        )
    state.num_processes, state.sync_bn = accelerator.num_processes, use_sync_bn  # recorded in every checkpoint
    status.running(accelerator.is_main_process, state.step)
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

    state.precision = accelerator.mixed_precision

    def sync_skip_counts(to_state: bool) -> None:
        """fp16 skips are counted on the device by the step; the state holds them for logs and checkpoints."""
        if to_state:
            state.skipped_steps_d, state.skipped_steps_g = gan_step.skipped.tolist()
        else:
            gan_step.skipped.copy_(torch.tensor([state.skipped_steps_d, state.skipped_steps_g]))

    sync_skip_counts(to_state=False)
    stop = StopRequest(run_dir, accelerator, started=started)
    watch = NonFiniteWatch(accelerator, {"generator": generator, "discriminator": discriminator})
    meter = MetricMeter()
    last_metrics: dict[str, float] = {}
    start_step, start_time = state.step, time.perf_counter()
    window_step, window_time = state.step, start_time

    # Main-process writes go through main_decides: a failed write (a full disk) then stops every rank
    # with its message, instead of the main process alone while the others wait in a collective.
    def sample(name: str) -> None:
        def draw() -> None:
            with _stop_if_write_fails("sample grid", samples_dir / name, checkpointer):
                save_generator_grid(shown_g, grid_noise, samples_dir / name, accelerator.autocast)
            caption = f"step {state.step}, {state.images_seen} images seen"
            tracker.log_image("fixed_noise", samples_dir / name, state, caption)

        main_decides(accelerator, draw)

    def log_row(metrics: dict[str, float], images_per_s: float) -> None:
        # + learning rates, fp16 loss scale and skipped steps, CUDA memory
        record = {**metrics, **host_metrics(accelerator, {"G": opt_g, "D": opt_d}, state)}
        record["perf/images_per_s"] = images_per_s
        grid = generate_grid(shown_g, grid_noise, accelerator.autocast)
        record["samples/diversity"] = collapse.observe(grid, state.step)  # warns on mode collapse
        with _stop_if_write_fails("metrics", run_dir / "metrics.jsonl", checkpointer):
            tracker.write(record, state)  # metrics.jsonl, the dashboard, the console's log line

    is_label = score_label(cfg.eval.feature_extractor, short=True)  # IS, or a classifier score

    def evaluate(owed: bool = False) -> float:
        """FID / IS / KID of the shown generator (collective); keeps the best checkpoint. Returns seconds taken.

        `owed`: the evaluation of the step a stop saved before evaluating (its checkpoint says so).
        """
        results = evaluator.evaluate(shown_g)
        weights = "ema" if ema else "raw"
        kept = checkpointer.keep_if_best(
            state, cfg, results["fid"], {"weights": weights, "num_samples": results["num_samples"]}
        )
        scores = {k: results[k] for k in ("fid", "is_mean", "is_std", "kid_mean", "kid_std")}

        def record() -> None:
            with _stop_if_write_fails("metrics", run_dir / "metrics.jsonl", checkpointer):
                row = {f"eval/{name}": value for name, value in scores.items()}
                row.update({"eval/weights": weights, "eval/num_samples": results["num_samples"]})
                tracker.write({**row, "eval/seconds": results["eval_s"]}, state, owed=owed)
            if kept:
                tracker.log_best(checkpointer.dir)  # W&B summary best/*, and the best artifact if asked

        main_decides(accelerator, record)
        console.print(
            f"eval step {state.step} epoch {state.epoch} | FID {scores['fid']:.3f} | "
            f"{is_label} {scores['is_mean']:.3f} ± {scores['is_std']:.3f} | KID {scores['kid_mean']:.5f} ± "
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
            use_configured_optimizer_settings()
            # The newest checkpoint owes no evaluation here: if it was the stop checkpoint this start
            # resumed from, its evaluation was the first thing this start did.
            launch = {"num_processes": state.num_processes, "sync_bn": state.sync_bn}
            vars(state).update(vars(restored), rollbacks=attempt, evaluation_due=False, **launch)
            # the diverged stretch's rows go to metrics.replaced.jsonl: the replay writes its own
            main_decides(accelerator, lambda: rewind_metrics(run_dir / "metrics.jsonl", state.step))
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

    if state.evaluation_due:  # the stop that saved this checkpoint came before its evaluation
        if evaluator:
            window_time += evaluate(owed=True)
        state.evaluation_due = False
    console.start_progress(state.step, total_steps, state.epoch)  # a live display on a terminal only
    try:
        while state.step < total_steps and not stop.agreed:
            loader.set_epoch(state.epoch)  # the epoch's shuffle: same on every rank, from run.seed + epoch
            batches = accelerator.skip_first_batches(loader, state.step_in_epoch) if state.step_in_epoch else loader
            for real in batches:
                metrics = training.step(real, state.step, state.rollbacks)  # the GAN update, then the EMA's
                state.step += 1
                watch.update(metrics, state.step)
                state.step_in_epoch += 1
                meter.add(metrics, section="train")  # on the device until the log step's one reduction
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
                evaluation_due = evaluator is not None and (
                    (cfg.eval.every_epochs and epoch_done and state.epoch % cfg.eval.every_epochs == 0)
                    or (cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0)
                    or state.step >= total_steps
                )
                if stopping:
                    # Save before anything else: under torchrun, SIGTERM leaves 30 s until SIGKILL, so
                    # no evaluation and no upload may come between the signal and the checkpoint. An
                    # evaluation due at this step is recorded in it, and the resume does it first.
                    state.evaluation_due = evaluation_due
                    checkpointer.save(state, cfg)
                    state.evaluation_due = False

                if state.step % cfg.log.every_steps == 0 or state.step == total_steps or stopping:
                    last_metrics = meter.mean_across_ranks(accelerator)
                    now = time.perf_counter()
                    images_per_s = (state.step - window_step) * cfg.train.batch_size / max(now - window_time, 1e-9)
                    window_step, window_time = state.step, now
                    main_decides(accelerator, partial(log_row, last_metrics, images_per_s))
                if state.step % cfg.log.sample_every_steps == 0:
                    sample(f"step_{state.step:08d}.png")
                if epoch_done:
                    sample(f"epoch_{state.epoch:03d}.png")
                if evaluation_due and not stopping:
                    # Before the checkpoint of this step, so that a checkpoint never owes an evaluation
                    # unless a stop saved it (a crash during the evaluation replays from the previous one).
                    window_time += evaluate()  # evaluation time does not count against images/s
                if save_due:
                    checkpointer.save(state, cfg)
                if state.step >= total_steps or stopping:
                    break
    finally:
        console.stop_progress()
        stop.close()

    # No-op if this step is saved already. Every checkpoint refreshes the run root's weight files
    # (generator.safetensors, ...), so they hold this step's weights now.
    final_checkpoint = checkpointer.save(state, cfg)
    if state.step % cfg.log.sample_every_steps and state.step_in_epoch:
        sample(f"step_{state.step:08d}.png")
    if accelerator.is_main_process:
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
    status.ended(
        "stopped" if summary.stopped_early else "finished",
        step=state.step,
        total_steps=total_steps,
        reason=stop.reason,
        checkpoint=str(final_checkpoint),
    )
    # Finishes the tracker run (W&B prints its own summary) and tears down the process group:
    # nothing collective may follow, only rank 0's summary. A W&B sweep trial stopped by its job
    # script (a time limit, a preemption) goes back to the sweep's queue.
    requeued = tracker.finish(requeue=summary.stopped_early and sweep.requeue_wanted(stop.reason))
    accelerator.end_training()
    resume = "W&B requeues this trial; the next agent resumes it" if requeued else "run the same command to resume"
    console.print(
        f"{'stopped' if summary.stopped_early else 'finished'} at step {state.step}/{total_steps}"
        + (f" ({stop.reason}); {resume}" if summary.stopped_early else "")
        + f" | {format_duration(elapsed)}, {summary.images_per_s:.0f} img/s | checkpoint {final_checkpoint} | "
        f"samples {samples_dir} | weights {run_dir / 'generator.safetensors'}"
    )
    console.summary(summary, tracker.summary())
    return summary
