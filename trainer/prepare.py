"""`python -m trainer.prepare [--config FILE] [key=value ...]`: a run's one-time work, done before training.

Downloading CIFAR-10, packing a dataset into its memory-mapped cache, scanning a folder for
unreadable images, fetching the feature extractor's weights and computing the real-image
statistics for FID take minutes on a large dataset or a network filesystem. Inside a training
run, the other ranks would wait for that in a collective, whose timeout (NCCL's default is 10
minutes) kills them, the launcher then kills the preparing rank, nothing is cached, and every
requeue starts over. So the work happens here, where no collective waits:

- run this command once before launching (launch/slurm/job.sh does, before `srun`);
- or just train: the trainer runs the same preparation itself, on one process, before the process
  group exists, while the others wait on the launcher's key-value store (no timeout there), and
  finds everything cached when it was prepared already.

It takes the trainer's own arguments, so `python -m trainer.prepare <args>` prepares exactly what
`accelerate launch trainer/train.py <args>` will use.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from trainer.core.config import Config, evaluation_enabled, parse_args
from trainer.core.data import prepare_data
from trainer.quality.fid import load_feature_extractor, reference_statistics, resolve_weights
from trainer.util.errors import UserError
from trainer.util.ranks import launch_rank, one_process_first


def preparing_device() -> torch.device:
    """This process's GPU (reference statistics are keyed by device type), else the CPU. Local ranks map
    onto the visible devices as Accelerate maps them (modulo their count: several ranks may share one)."""
    if torch.cuda.is_available():
        return torch.device("cuda", launch_rank(local=True))
    return torch.device("cpu")


def prepare_evaluation(cfg: Config, log: Callable[[str], None] = print) -> str:
    """The feature extractor's weights (downloaded if needed) and the real-image statistics; returns their file."""
    ev = cfg.eval
    weights = resolve_weights(ev.feature_extractor, ev.feature_extractor_weights)
    extractor = load_feature_extractor(ev.feature_extractor, weights)
    return str(reference_statistics(cfg, extractor, weights, preparing_device(), log).path)


def prepare(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Everything slow that a run needs once; returns what every process needs to find it (JSON-able)."""
    start = time.perf_counter()
    prepared: dict[str, Any] = {"data": prepare_data(cfg.data, cfg.model.resolution, cfg.run.seed)}
    if evaluation_enabled(cfg):
        prepared["reference"] = prepare_evaluation(cfg, log)
    log(f"prepared in {time.perf_counter() - start:.1f}s: {prepared}")
    return prepared


def prepare_before_launch(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`prepare` on one process (each node's first with data.cache_per_node) before the process group
    exists; every process gets its answer, or its error."""
    return one_process_first(lambda: prepare(cfg, log), name="prepare", per_node=cfg.data.cache_per_node)


def main(argv: list[str] | None = None) -> int:
    """The training command line's arguments (same --config, overrides, --help, --print-config)."""
    try:
        description = "Do a training run's one-time work (download, pack, scan, reference statistics) before it starts."
        prepare(parse_args(argv, prog="python -m trainer.prepare", description=description))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
