"""Draw a run's dashboard charts into one PNG, e.g. for docs or a report.

    pip install matplotlib   # not a dependency of the trainer (the test extra has it)
    python docs/plot_run.py runs/dcgan_cifar10 docs/figures/dashboard.png

Reads the run's `metrics.jsonl`, which holds the very rows its W&B run charts (tests/test_tracking.py
checks that they match): training rows (losses, D outputs, gradient norms, images/s) and evaluation
rows (FID, IS), each chart from the rows that have its key; plus the real grid and the newest
fixed-noise grid.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

PANELS = [
    ("train/loss_D, train/loss_G", ["loss_D", "loss_G"], "linear"),
    ("train/D(x), train/D(G(z)) before and after", ["D(x)", "D(G(z))_before", "D(G(z))_after"], "linear"),
    ("train/grad_norm_D, train/grad_norm_G", ["grad_norm_D", "grad_norm_G"], "log"),
    ("perf/images_per_s (global)", ["images_per_s"], "linear"),
    ("eval/fid", ["fid"], "linear"),
    ("eval/is_mean", ["is_mean"], "linear"),
]


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def plot_run(run_dir: Path, out: Path) -> None:
    rows = read_rows(run_dir)
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5), constrained_layout=True)
    for ax, (title, names, scale) in zip(axes.flat, PANELS, strict=False):
        for name in names:
            having = [row for row in rows if name in row]  # evaluation rows have no losses, and vice versa
            style = "o-" if name in ("fid", "is_mean") or len(having) < 20 else "-"  # a few points: visible
            ax.plot([row["images_seen"] / 1000 for row in having], [row[name] for row in having], style, label=name)
        ax.set_title(title)
        ax.set_xlabel("thousand images seen")
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend()
    samples = run_dir / "samples"
    grids = [*samples.glob("step_*.png"), *samples.glob("epoch_*.png")]
    shown = [(axes[1, 2], samples / "real.png", "samples/real")]
    if grids:
        newest = max(grids, key=lambda p: p.stat().st_mtime)
        kind, number = newest.stem.split("_")
        shown.append((axes[1, 3], newest, f"samples/fixed_noise ({kind} {int(number)})"))
    for ax in axes[1, 2:]:
        ax.axis("off")
    for ax, path, title in shown:
        if path.is_file():
            with Image.open(path) as image:
                ax.imshow(image.convert("RGB"))
            ax.set_title(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory, e.g. runs/dcgan_cifar10")
    parser.add_argument("out", type=Path, help="the PNG to write")
    args = parser.parse_args()
    plot_run(args.run_dir, args.out)


if __name__ == "__main__":
    main()
