"""A run's quality curve: the evaluation scores (FID, classifier/Inception score) and the losses, per epoch.

    pip install matplotlib   # not a dependency of the trainer (the test extra has it)
    python docs/plot_quality_curve.py runs/dcgan32_cifar10 docs/figures/dcgan32_schedule.png

Reads `metrics.jsonl` (evaluation rows carry `fid`, loss rows `loss_D`/`loss_G`), draws both against
epochs (fractional for the loss windows), puts the newest fixed-noise grid beside them and prints
the evaluation table in Markdown. The length of an epoch comes from the rows themselves: each row
holds its step and the epochs completed by then.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402


def steps_per_epoch(rows: list[dict]) -> int | None:
    """The longest epoch every row agrees with (a row at step s after e epochs says epochs are at most
    s // e steps long); exact once a row falls on an epoch's end (an evaluation every N epochs does).
    None before the first epoch ends."""
    bounds = [row["step"] // row["epoch"] for row in rows if row.get("epoch")]
    return min(bounds) if bounds else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps-per-epoch", type=int, help="default: from the rows of metrics.jsonl")
    args = parser.parse_args()
    lines = (args.run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    evals = [r for r in rows if "fid" in r]
    losses = [r for r in rows if "loss_D" in r]
    per = args.steps_per_epoch or steps_per_epoch(rows)
    unit = "epoch" if per else "step"

    def x(row: dict) -> float:
        return row["step"] / per if per else row["step"]

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
    ax = axes[0]
    ax.plot([x(r) for r in evals], [r["fid"] for r in evals], "o-", label="FID")
    ax.set_xlabel(unit)
    ax.set_ylabel("FID")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot([x(r) for r in evals], [r["is_mean"] for r in evals], "s--", color="C1", label="score")
    twin.set_ylabel("classifier / Inception score")
    samples = evals[-1].get("eval_num_samples") if evals else None
    ax.set_title(f"evaluations ({samples} samples)" if samples else "evaluations")
    ax.legend(loc="upper right")
    twin.legend(loc="center right")
    for name in ("loss_D", "loss_G"):
        axes[1].plot([x(r) for r in losses], [r[name] for r in losses], label=name, lw=0.8)
    axes[1].set_xlabel(unit)
    axes[1].set_title("losses (log.every_steps windows)")
    axes[1].legend()
    axes[1].grid(alpha=0.3)
    grids = sorted((args.run_dir / "samples").glob("epoch_*.png")) or sorted(
        (args.run_dir / "samples").glob("step_*.png")
    )
    if grids:
        with Image.open(grids[-1]) as image:
            axes[2].imshow(image.convert("RGB"))
        axes[2].set_title(f"fixed-noise grid, {grids[-1].stem.replace('_', ' ')}")
    axes[2].axis("off")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)

    print(("| epoch " if per else "") + "| step | FID | KID x 1000 | score | eval s |")
    print(("|---:" if per else "") + "|---:|---:|---:|---:|---:|")
    for r in evals:
        print(
            (f"| {x(r):.2f} " if per else "") + f"| {r['step']} | {r['fid']:.2f} | {1000 * r['kid_mean']:.2f} | "
            f"{r['is_mean']:.2f} ± {r['is_std']:.2f} | {r.get('eval_s', float('nan')):.0f} |"
        )


if __name__ == "__main__":
    main()
