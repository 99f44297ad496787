"""Do two training setups train alike? Compare their loss curves against run-to-run (seed) noise.

    python docs/compare_runs.py A=runs/optimized B=runs/plain A1=runs/optimized_seed1 B1=runs/plain_seed1 \
        --out docs/figures/optimized_vs_plain.png

Windowed means (100 steps) of loss_D, loss_G, D(x) and D(G(z)) for each run; then the mean
absolute gap between the curves of A and B next to the gaps between two seeds of the same setup
(A vs A1, B vs B1). If A-vs-B is no larger than the seed-to-seed gaps, the setups agree within
run-to-run noise. With matplotlib installed (not a dependency), also draws the curves and each
run's final fixed-noise grid.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = ("loss_D", "loss_G", "D(x)", "D(G(z))_before")


def windows(run: Path, size: int) -> dict[str, list[float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss_D" in r]
    last = max(r["step"] for r in rows)
    out: dict[str, list[float]] = {m: [] for m in METRICS}
    for start in range(0, last, size):
        chunk = [r for r in rows if start < r["step"] <= start + size]
        for m in METRICS:
            out[m].append(sum(r[m] for r in chunk) / len(chunk))
    return out


def gap(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, float]:
    return {m: sum(abs(x - y) for x, y in zip(a[m], b[m], strict=False)) / min(len(a[m]), len(b[m])) for m in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs = dict(item.split("=", 1) for item in args.runs)
    curves = {label: windows(Path(path), args.window) for label, path in runs.items()}
    print(f"{'window means':16}" + "".join(f"{m:>16}" for m in METRICS))
    for label, curve in curves.items():
        print(f"{label + ' (last)':16}" + "".join(f"{curve[m][-1]:16.3f}" for m in METRICS))
    pairs = [(a, b) for a, b in (("A", "B"), ("A", "A1"), ("B", "B1"), ("A1", "B1")) if a in curves and b in curves]
    print(f"\n{'mean |gap|':16}" + "".join(f"{m:>16}" for m in METRICS))
    for a, b in pairs:
        g = gap(curves[a], curves[b])
        print(f"{a + ' vs ' + b:16}" + "".join(f"{g[m]:16.3f}" for m in METRICS))
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from PIL import Image

        fig, axes = plt.subplots(2, len(METRICS), figsize=(4.2 * len(METRICS), 8), constrained_layout=True)
        for i, m in enumerate(METRICS):
            for label, curve in curves.items():
                axes[0, i].plot([args.window * (k + 1) for k in range(len(curve[m]))], curve[m], label=label)
            axes[0, i].set_title(f"{m} ({args.window}-step means)")
            axes[0, i].set_xlabel("step")
            axes[0, i].legend()
        for i, (label, path) in enumerate(list(runs.items())[: len(METRICS)]):
            grid = sorted((Path(path) / "samples").glob("step_*.png"))[-1]
            axes[1, i].imshow(Image.open(grid))
            axes[1, i].set_title(f"{label}: {grid.name}")
            axes[1, i].axis("off")
        fig.savefig(args.out, dpi=80)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
