"""Calibrate the `diversity` measure (trainer/monitor/diversity.py): real images, noise, trained and collapsed generators.

    python tools/calibrate_diversity.py --data <cifar10-jpg>/train --resolution 64 RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a training run directory: every checkpoint in it is measured (its step in the row).
Rows, each the per-pixel standard deviation across the samples relative to that of real images
(the value the loop logs as `diversity` and the health watch and the GPU check judge):

- real images against another draw of real images (the measure's noise floor is its spread around 1);
- uniform noise images;
- a generator at initialisation, and each checkpoint, in eval mode (BatchNorm running statistics,
  as the fixed-noise grid is drawn), on the 64 fixed-noise latents of the grid and on 1,000 latents;
- collapsed generators made from the last checkpoint: every latent replaced by one latent (total
  collapse), and latents shrunk to 10% of their length around one point (a generator that almost
  ignores z).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: import this checkout's trainer

from trainer.core.checkpoint import complete_checkpoints, load_generator  # noqa: E402
from trainer.core.config import ModelConfig  # noqa: E402
from trainer.core.data import to_model_input  # noqa: E402
from trainer.core.models import Generator, init_weights  # noqa: E402
from trainer.monitor.diversity import pixel_diversity  # noqa: E402
from trainer.monitor.grids import fixed_noise, generate_grid  # noqa: E402


def real_images(root: Path, count: int, seed: int, resolution: int) -> torch.Tensor:
    """`count` random images of an ImageFolder tree through the trainer's data path, in [-1, 1]."""
    import numpy as np
    from PIL import Image
    from torchvision.datasets import ImageFolder

    files = ImageFolder(str(root)).samples
    picks = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:count]
    arrays = [np.asarray(Image.open(files[int(i)][0]).convert("RGB")) for i in picks]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return to_model_input(batch, resolution)


def eval_images(generator: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    return generate_grid(generator, latents, contextlib.nullcontext)  # fp32, eval mode: as the loop's grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, help="training run directories (their checkpoints are measured)")
    parser.add_argument("--data", type=Path, required=True, help="real images (an ImageFolder tree)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--nz", type=int, default=100)
    parser.add_argument("--ngf", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    real = real_images(args.data, 1000, 0, args.resolution)
    base = pixel_diversity(real[:64]), pixel_diversity(real)

    def row(label: str, images64: torch.Tensor, images1000: torch.Tensor | None) -> None:
        wide = f"{pixel_diversity(images1000) / base[1]:.3f}" if images1000 is not None else "-"
        print(f"| {label} | {pixel_diversity(images64) / base[0]:.3f} | {wide} |", flush=True)

    grid_z = fixed_noise(64, args.nz, 0)
    wide_z = torch.randn(1000, args.nz, generator=torch.Generator().manual_seed(1))
    print(
        f"real images' own value: {base[0]:.4f} (64 images), {base[1]:.4f} (1,000) at {args.resolution}x{args.resolution}"
    )
    print("| images | diversity, 64 (the grid) | diversity, 1,000 |")
    print("|---|---:|---:|")
    other = real_images(args.data, 1000, 1, args.resolution)
    row("real images, another draw", other[:64], other)
    noise = torch.rand(1000, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(2)) * 2 - 1
    row("uniform noise images", noise[:64], noise)
    torch.manual_seed(0)
    g0 = Generator(args.nz, args.ngf, args.resolution)
    g0.apply(init_weights)
    row("generator at initialisation (eval mode)", eval_images(g0, grid_z), eval_images(g0, wide_z))
    last = None
    for run in args.runs:
        for checkpoint in complete_checkpoints(run / "checkpoints"):
            model = ModelConfig(nz=args.nz, ngf=args.ngf, resolution=args.resolution)
            g, _ = load_generator(checkpoint, model)
            row(f"{run.name}, {checkpoint.name}", eval_images(g, grid_z), eval_images(g, wide_z))
            last = (run, checkpoint, g)
    if last is not None:
        run, checkpoint, g = last
        one = wide_z[:1].expand(1000, -1)
        row(
            f"collapsed: {run.name} {checkpoint.name}, one latent for all",
            eval_images(g, one[:64]),
            eval_images(g, one),
        )
        shrunk = wide_z[:1] + 0.1 * (wide_z - wide_z[:1])
        row(
            f"nearly collapsed: {run.name} {checkpoint.name}, latents shrunk to 10%",
            eval_images(g, shrunk[:64]),
            eval_images(g, shrunk),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
