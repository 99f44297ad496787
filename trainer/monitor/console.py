"""Console output from the main process only: a config table, progress, and a summary table.

On a terminal, a live rich progress display (epoch, step, images/s, losses, elapsed time, ETA)
sits below the log lines. Anywhere else (Slurm logs, pipes, files) there is no live display and
no control sequences: only the same plain log line every `log.every_steps`, so the log stays
readable. Other ranks print nothing here; their warnings and errors still reach stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from rich import box
from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from trainer.monitor.sinks import Record

PLAIN_WIDTH = 160  # without a terminal: wide enough that table rows with paths stay on one line


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


class Console:
    def __init__(self, accelerator: Accelerator) -> None:
        self.enabled = accelerator.is_main_process
        probe = RichConsole(file=sys.stdout)
        self.interactive = self.enabled and probe.is_terminal and not probe.is_dumb_terminal
        self._rich = RichConsole(
            file=sys.stdout,
            highlight=False,
            soft_wrap=True,
            width=None if self.interactive else PLAIN_WIDTH,
            # Without a terminal rich writes plain text, but FORCE_COLOR would still add colour codes.
            no_color=not self.interactive,
        )
        self._progress: Progress | None = None
        self._task: Any = None
        self._total_steps = 0

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if self.enabled:
            kwargs.setdefault("markup", False)  # log text such as "betas=[0.5, 0.999]" is not markup
            self._rich.print(*objects, **kwargs)

    # ---- start ---------------------------------------------------------------------------
    def config(self, changed: Mapping[str, Any], path: str) -> None:
        """The resolved config, compactly: the keys that differ from the defaults, dotted; `path`
        (config.yaml) holds every key."""
        if not self.enabled:
            return
        if not changed:
            self._rich.print(f"resolved config ({path}): every key at its default (--help lists them)")
            return
        table = Table(
            title=f"resolved config ({path})",
            caption=f"the keys that differ from the defaults (--help lists the defaults); {path} holds every key",
            box=box.SIMPLE_HEAD,
            title_justify="left",
            caption_justify="left",
        )
        table.add_column("key", no_wrap=True)
        table.add_column("value", overflow="fold")
        for key, value in changed.items():
            table.add_row(key, Text(_format_value(value)))  # Text: rich would read [a, b] as markup
        self._rich.print(table)

    # ---- during training -----------------------------------------------------------------
    def start_progress(self, step: int, total_steps: int, epoch: int) -> None:
        """On a terminal only: the live progress display (advanced every step, values every log step)."""
        self._total_steps = total_steps  # for the log lines' ETA
        if not self.interactive:
            return
        self._progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            TextColumn("step"),
            MofNCompleteColumn(),
            TextColumn("{task.fields[speed]}"),
            TextColumn("{task.fields[losses]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self._rich,
            transient=True,  # the log lines and the summary stay; the bar goes when training ends
        )
        self._task = self._progress.add_task(
            "train", total=total_steps, completed=step, epoch=epoch, speed="", losses=""
        )
        self._progress.start()

    def advance(self, step: int, epoch: int) -> None:
        """Per step: host-side numbers only, nothing is read from the device."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step, epoch=epoch)

    def write(self, record: Record) -> None:
        """A sink (monitor/sinks.py): the periodic line of a training row (both modes; on a terminal it also
        refreshes the progress display). Evaluations get their own line from the loop."""
        values = record.values
        if not self.enabled or "perf/images_per_s" not in values:
            return
        images_per_s, total = values["perf/images_per_s"], self._total_steps
        eta_s = (total - record.step) * record.images_seen / max(record.step, 1) / max(images_per_s, 1e-9)
        self.print(
            f"step {record.step}/{total} epoch {record.epoch} | {format_metrics(values)} | {images_per_s:.0f} img/s "
            f"| eta {format_duration(eta_s)}"
        )
        if self._progress is not None:
            shown = (("loss_D", "train/loss_D"), ("loss_G", "train/loss_G"), ("D(x)", "train/D(x)"))
            losses = " ".join(f"{label} {values[name]:.3f}" for label, name in shown if name in values)
            self._progress.update(self._task, speed=f"{images_per_s:.0f} img/s", losses=losses)

    def stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # ---- end -----------------------------------------------------------------------------
    def summary(self, summary: RunSummary, tracking: Sequence[tuple[str, str]]) -> None:
        """The end-of-run table: how it went and where everything is."""
        if not self.enabled:
            return
        status = (
            f"stopped ({summary.stop_reason}); run the same command to resume" if summary.stopped_early else "finished"
        )
        run_dir = summary.run_dir
        rows = [
            ("status", status),
            ("steps", f"{summary.step}/{summary.total_steps} (epoch {summary.epoch})"),
            ("wall time", f"{format_duration(summary.wall_time_s)} (this start)"),
            ("images/s", f"{summary.images_per_s:.0f} (global, this start)"),
            ("final metrics", format_metrics(summary.last_metrics) or "none logged"),
            ("checkpoint", str(summary.checkpoint)),
            ("samples", str(run_dir / "samples")),
            ("weights", f"{run_dir / 'generator.safetensors'}, {run_dir / 'discriminator.safetensors'}"),
            ("metrics", str(run_dir / "metrics.jsonl")),
            *tracking,
        ]
        table = Table(title="run summary", box=box.SIMPLE_HEAD, show_header=False, title_justify="left")
        table.add_column("what", no_wrap=True)
        table.add_column("value", overflow="fold")
        for name, value in rows:
            table.add_row(name, Text(value))
        self._rich.print(table)


def format_metrics(metrics: Mapping[str, float]) -> str:
    """The step metrics of a log line: losses | D outputs (fake: before -> after the G step) | gradient norms."""
    m = {name.removeprefix("train/"): value for name, value in metrics.items() if name.startswith("train/")}
    parts = []
    if "loss_D" in m and "loss_G" in m:
        parts.append(f"loss_D {m['loss_D']:.4f} loss_G {m['loss_G']:.4f}")
    if "D(x)" in m and "D(G(z))_before" in m and "D(G(z))_after" in m:
        parts.append(f"D(x) {m['D(x)']:.4f} D(G(z)) {m['D(G(z))_before']:.4f} -> {m['D(G(z))_after']:.4f}")
    if "grad_norm_D" in m and "grad_norm_G" in m:
        parts.append(f"grad norm D {m['grad_norm_D']:.3g} G {m['grad_norm_G']:.3g}")
    return " | ".join(parts)


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return "null" if value is None else str(value)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
