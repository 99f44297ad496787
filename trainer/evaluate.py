"""`python -m trainer.evaluate <run dir or checkpoint> [--best] [--raw] [--bn-stats running|batch] [--out FILE] [key=value ...]`

FID, Inception Score (a classifier score with an extractor other than InceptionV3) and KID of a
checkpoint's generator (its EMA weights when it has them), with the settings it was trained with
plus any overrides (e.g. eval.num_samples=50000). Prints a table and saves it as JSON and Markdown
under `<run dir>/eval/`. Under `accelerate launch` every process
generates and embeds its share of the samples; the result equals a one-process evaluation.

When the checkpoint was trained with W&B, the results are also added to that W&B run (its id is in
the checkpoint), under eval/posthoc/, not to a new run; `log.tracker=none` skips that.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from trainer.core.checkpoint import (
    add_checkpoint_arguments,
    checkpoint_config,
    find_checkpoint,
    load_generator,
    run_dir_of,
)
from trainer.core.config import Config, program_name
from trainer.core.runtime import build_accelerator
from trainer.monitor.console import Console
from trainer.monitor.wandb_sink import POSTHOC, evaluation_target, log_evaluation
from trainer.prepare import prepare_evaluation
from trainer.quality.fid import Evaluator, add_bn_stats_argument, score_label
from trainer.util.errors import UserError
from trainer.util.ranks import launch_rank, main_decides, one_process_first


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program_name("dcgan-evaluate", "python -m trainer.evaluate"),
        description="FID / IS / KID of a checkpoint's generator (EMA weights when present).",
        epilog="example: accelerate launch -m trainer.evaluate runs/dcgan_cifar10 eval.num_samples=50000",
    )
    add_checkpoint_arguments(parser)
    parser.add_argument("--out", help="JSON file to write (default: <run dir>/eval/<checkpoint>-<ema|raw>-n<N>.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_bn_stats_argument(parser)
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.num_samples=50000"
    )
    return parser.parse_intermixed_args(argv)  # options may come between the target and the overrides


SETTINGS = ("feature_extractor", "num_samples", "seed", "split", "num_real", "kid_subsets")


def _settings(cfg: Config) -> dict[str, Any]:
    return {k: getattr(cfg.eval, k) for k in SETTINGS}


def _same_evaluation(out: Path, checkpoint: Path, weights: str, cfg: Config) -> dict[str, Any] | None:
    """The report saved at `out` if it evaluated this checkpoint's `weights` with these settings: the
    scores are deterministic, so running it again would only repeat them."""
    try:
        report = json.loads(out.read_text())
        same = (
            Path(report["checkpoint"]).resolve() == checkpoint.resolve()
            and report["weights"] == weights
            and report["settings"] == _settings(cfg)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return report if same else None


def markdown_table(report: dict[str, Any]) -> str:
    m = report["metrics"]
    lines = [
        f"Checkpoint `{report['checkpoint']}` (step {report['step']}, {report['weights']} generator), "
        f"{m['num_samples']} generated vs {m['num_real']} real images ({report['settings']['split']} split), "
        f"feature extractor `{report['settings']['feature_extractor']}`, {report['bn_stats']} BatchNorm statistics",
        "",
        "| metric | value | |",
        "|---|---|---|",
        f"| FID | {m['fid']:.4f} | lower is better |",
        f"| {score_label(report['settings']['feature_extractor'])} | {m['is_mean']:.4f} ± {m['is_std']:.4f} | "
        "higher is better |",
        f"| KID | {m['kid_mean']:.6f} ± {m['kid_std']:.6f} | lower is better (subsets of {m['kid_subset_size']}) |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    accelerator = None
    try:
        checkpoint = find_checkpoint(args.target, args.best)
        cfg = checkpoint_config(checkpoint, args.overrides)
        generator, weights = load_generator(checkpoint, cfg.model, args.raw)
        mode = "-batchbn" if args.bn_stats == "batch" else ""  # never mistaken for (or replacing) the default table
        out = (
            Path(args.out)
            if args.out
            else run_dir_of(checkpoint) / "eval" / f"{checkpoint.name}-{weights}-n{cfg.eval.num_samples}{mode}.json"
        )
        if out.suffix != ".json":
            raise UserError(f"--out {args.out} must end in .json (a Markdown table is written beside it)")
        if out.exists() and not args.overwrite:
            saved = None if args.out else _same_evaluation(out, checkpoint, weights, cfg)  # default name only
            if saved is None:
                raise UserError(f"{out} exists; pass --overwrite to replace it, or --out <another file>.json")
            if launch_rank() == 0:
                print(
                    markdown_table(saved) + f"\nalready evaluated with these settings: {out} (--overwrite to recompute)"
                )
            return 0

        # The reference statistics: computed once, before the process group, where no collective waits
        one_process_first(lambda: prepare_evaluation(cfg), name="prepare-evaluation")
        accelerator = build_accelerator(cfg)  # gloo on CPU, NCCL on GPUs, as in training
        console = Console(accelerator)
        target = main_decides(accelerator, lambda: evaluation_target(cfg, checkpoint))  # W&B errors come first
        evaluator = Evaluator(cfg, accelerator, console.print)
        console.print(
            f"evaluating {checkpoint} ({weights} generator) on {accelerator.num_processes} process(es): "
            f"{cfg.eval.num_samples} samples, seed {cfg.eval.seed}, {args.bn_stats} BN statistics"
        )
        metrics = evaluator.evaluate(generator.to(accelerator.device), args.bn_stats)
        if accelerator.is_main_process:
            step = json.loads((checkpoint / "train_state.json").read_text())["step"]
            report = {
                "checkpoint": str(checkpoint),
                "step": step,
                "weights": weights,
                "metrics": metrics,
                "settings": _settings(cfg),
                "reference": str(evaluator.reference().path),
                "processes": accelerator.num_processes,
                "bn_stats": args.bn_stats,
            }
            table = markdown_table(report)
            logged = log_evaluation(target, cfg, run_dir_of(checkpoint), report, out)
            if logged:
                report["wandb"] = logged  # its step: the next evaluation logs after it
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
            out.with_suffix(".md").write_text(table)
            console.print(table + f"\nsaved {out} and {out.with_suffix('.md')}")
            if logged:
                sync = f"; upload with: wandb sync {run_dir_of(checkpoint) / 'wandb'}/offline-run-*"
                console.print(
                    f"W&B: added to run {logged['run_id']} under {POSTHOC}/ ({logged['location']})"
                    + (sync if logged["mode"] == "offline" else "")
                )
            elif target.run_id is None:
                console.print(f"W&B: not logged ({target.why})")
    except UserError as exc:
        if accelerator.is_main_process if accelerator else launch_rank() == 0:
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        if accelerator is not None:
            accelerator.end_training()  # tears down the process group
    return 0


if __name__ == "__main__":
    sys.exit(main())
