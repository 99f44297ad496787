"""The arguments that `trainer.evaluate` and `trainer.sample` share: which checkpoint, which generator, how it samples.

The checkpoint layout itself (finding the newest intact or the best checkpoint, loading its
generator) belongs to `trainer.core.checkpoint`; this module only turns command-line arguments into calls to it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.core.checkpoint import CONFIG
from trainer.core.config import Config, load_config
from trainer.quality.fid import BN_STATS


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """`target`, `--best` and `--raw`: which checkpoint and which generator, as `load_generator` reads them."""
    parser.add_argument("target", help="a run directory (its newest checkpoint) or a checkpoint directory")
    parser.add_argument("--best", action="store_true", help="the run's best checkpoint (lowest FID) instead")
    parser.add_argument("--raw", action="store_true", help="the raw generator even if the checkpoint has an EMA")


def checkpoint_config(checkpoint: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config the checkpoint was trained with, plus `key=value` overrides (e.g. eval.num_samples=50000)."""
    return load_config(str(checkpoint / CONFIG), overrides)


def add_bn_stats_argument(parser: argparse.ArgumentParser) -> None:
    """`--bn-stats running|batch`, shared with trainer.evaluate."""
    parser.add_argument(
        "--bn-stats",
        choices=BN_STATS,
        default="running",
        help="BatchNorm in G: running statistics (eval mode, default), or each batch's own statistics "
        "(train mode, as the classic loop's grids; the stored running statistics are left untouched)",
    )
