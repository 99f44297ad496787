"""A run's quality curve: the evaluation scores (FID, classifier/Inception score) and the losses, per epoch.

    pip install matplotlib   # not a dependency of the trainer
    python docs/plot_quality_curve.py runs/dcgan32_cifar10 docs/figures/dcgan32_schedule.png

Reads `metrics.jsonl` (evaluation rows carry `fid`, loss rows `loss_D`/`loss_G`), draws both against
epochs (fractional for the loss windows), puts the newest fixed-noise grid beside them and prints
the evaluation table in Markdown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps-per-epoch", type=int, default=781, help="CIFAR-10 at batch 64: 781")
    args = parser.parse_args()
    rows = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "fid" in r]
    losses = [r for r in rows if "loss_D" in r]
    per = args.steps_per_epoch

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
    ax = axes[0]
    ax.plot([r["step"] / per for r in evals], [r["fid"] for r in evals], "o-", label="FID (classifier features)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("FID")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot([r["step"] / per for r in evals], [r["is_mean"] for r in evals], "s--", color="C1", label="score")
    twin.set_ylabel("classifier score")
    ax.set_title("offline measure per epoch (10k samples)")
    ax.legend(loc="upper right")
    twin.legend(loc="center right")
    for name in ("loss_D", "loss_G"):
        axes[1].plot([r["step"] / per for r in losses], [r[name] for r in losses], label=name, lw=0.8)
    axes[1].set_xlabel("epoch")
    axes[1].set_title("losses (log.every_steps windows)")
    axes[1].legend()
    axes[1].grid(alpha=0.3)
    grids = sorted((args.run_dir / "samples").glob("epoch_*.png"))
    if grids:
        with Image.open(grids[-1]) as image:
            axes[2].imshow(image.convert("RGB"))
        axes[2].set_title(f"fixed-noise grid, {grids[-1].stem.replace('_', ' ')}")
    axes[2].axis("off")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)

    print("| epoch | step | FID (classifier) | KID x 1000 | classifier score | eval s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in evals:
        print(
            f"| {r['epoch']} | {r['step']} | {r['fid']:.2f} | {1000 * r['kid_mean']:.2f} | "
            f"{r['is_mean']:.2f} ± {r['is_std']:.2f} | {r.get('eval_s', float('nan')):.0f} |"
        )


if __name__ == "__main__":
    main()
