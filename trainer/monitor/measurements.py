"""Per-step measurements, collected once and handed to every sink (monitor/sinks.py) as one record.

The GAN step returns metric tensors; `MetricMeter`, the collector, sums them on the device between
log steps and averages them over the window and across ranks in one reduction (the log step's only
host sync), under their section (`train/loss_D`). `host_metrics` adds what the host already knows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from accelerate import Accelerator

from trainer.core.checkpoint import TrainState
from trainer.util.atomic import write_text_atomic


class MetricMeter:
    """Sums metric tensors on the device between log steps; `mean_across_ranks` is their only host sync."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, metrics: dict[str, torch.Tensor], section: str = "") -> None:
        """One step's device tensors, named `<section>/<name>` when `section` is given (no host sync)."""
        for name, value in metrics.items():
            name = f"{section}/{name}" if section else name
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.count += 1

    def reset(self) -> None:
        self.sums, self.count = {}, 0

    def mean_across_ranks(self, accelerator: Accelerator) -> dict[str, float]:
        """The window's mean on each rank, then the mean over ranks (every rank has the same count)."""
        if not self.count:
            return {}
        names = list(self.sums)
        local = torch.stack([self.sums[n].float() for n in names]) / self.count
        values = accelerator.reduce(local, reduction="mean").tolist()
        self.reset()
        return dict(zip(names, values, strict=True))


def host_metrics(
    accelerator: Accelerator, optimizers: Mapping[str, torch.optim.Optimizer], state: TrainState
) -> dict[str, float]:
    """Metrics the host already knows (no device work): learning rates, fp16 scaler, CUDA memory.

    Called at log steps only: reading the loss scale is a host sync.
    """
    values = {f"opt/lr_{name}": float(opt.param_groups[0]["lr"]) for name, opt in optimizers.items()}
    if accelerator.scaler is not None:  # fp16: the loss scale falls when gradients overflow, steps are skipped
        values["amp/loss_scale"] = float(accelerator.scaler.get_scale())
        values["amp/skipped_steps_D"] = float(state.skipped_steps_d)
        values["amp/skipped_steps_G"] = float(state.skipped_steps_g)
    if accelerator.device.type == "cuda":  # this rank's GPU; the allocator's counters, no sync
        device = accelerator.device
        values["perf/gpu_mem_allocated_GiB"] = torch.cuda.memory_allocated(device) / 2**30
        values["perf/gpu_mem_peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        values["perf/gpu_mem_reserved_GiB"] = torch.cuda.memory_reserved(device) / 2**30
    return values


REPLACED_SUFFIX = ".replaced.jsonl"  # metrics.replaced.jsonl: rows a resume or a rollback took out


def rewind_metrics(path: Path, step: int, redo_evaluation: bool = False) -> int:
    """Take out of metrics.jsonl the rows that training from the checkpoint of `step` writes again:
    those after `step` (a killed run's last rows, a diverged stretch before a rollback) and, with
    `redo_evaluation`, the evaluation at `step` that the resume owes. Every step then has one row,
    of the trajectory the checkpoints hold. The rows taken out are appended to metrics.replaced.jsonl,
    never lost. Returns how many were taken out. Main process."""
    if not path.is_file():
        return 0
    keep, out = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
            row_step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            keep.append(line)  # not ours to judge (a hand edit, a line cut short by a crash)
            continue
        replayed = row_step > step or (redo_evaluation and row_step == step and "fid" in record)
        (out if replayed else keep).append(line)
    if out:
        with open(path.with_name(path.stem + REPLACED_SUFFIX), "a") as fh:
            fh.writelines(line if line.endswith("\n") else line + "\n" for line in out)
        write_text_atomic(path, "".join(keep))
    return len(out)
