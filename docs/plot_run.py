"""Draw a run's dashboard charts into one PNG, e.g. for docs or a report.

    pip install matplotlib   # not a dependency of the trainer
    python docs/plot_run.py runs/dcgan_cifar10 docs/figures/dashboard.png

Reads the run's `metrics.jsonl`, which holds the very rows its W&B run charts (tests/test_tracking.py
checks that they match), its real grid and its newest fixed-noise grid.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402


def plot_run(run_dir: Path, out: Path) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    x = [row["images_seen"] / 1000 for row in rows]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), constrained_layout=True)
    panels = [
        ("train/loss_D, train/loss_G", ["loss_D", "loss_G"], "linear"),
        ("train/D(x), train/D(G(z)) before and after", ["D(x)", "D(G(z))_before", "D(G(z))_after"], "linear"),
        ("train/grad_norm_D, train/grad_norm_G", ["grad_norm_D", "grad_norm_G"], "log"),
        ("perf/images_per_s (global)", ["images_per_s"], "linear"),
    ]
    for ax, (title, names, scale) in zip(axes.flat, panels, strict=False):
        for name in names:
            ax.plot(x, [row[name] for row in rows], label=name)
        ax.set_title(title)
        ax.set_xlabel("thousand images seen")
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend()
    samples = run_dir / "samples"
    newest = max([*samples.glob("step_*.png"), *samples.glob("epoch_*.png")], key=lambda p: p.stat().st_mtime)
    for ax, path, title in (
        (axes[1, 1], samples / "real.png", "samples/real"),
        (axes[1, 2], newest, f"samples/fixed_noise ({newest.stem.replace('_', ' ').lstrip('0')})"),
    ):
        with Image.open(path) as image:
            ax.imshow(image.convert("RGB"))
        ax.set_title(title)
        ax.axis("off")
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
