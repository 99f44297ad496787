"""`python -m trainer.sample <run dir or checkpoint> --out PATH [--num N] [--seed S] [--interpolate STEPS]`

Images from a checkpoint's generator (its EMA weights when it has them; --raw for the others),
quantized to uint8 as evaluation does. The format follows --out:

    *.png   a grid of --num images (default 64), --nrow per row
    *.npz   one uint8 array `arr_0` of shape (num, height, width, 3)
    other   a new folder of PNG files 000000.png, 000001.png, ...

With --interpolate STEPS: --num pairs of latents (default 8), each walked in STEPS images along the
great circle between them (slerp, which keeps Gaussian latents at a typical norm), as a *.png grid
(one row per pair) or a *.gif (STEPS frames, each a grid of the pairs).

Sample i is drawn from latent i of the seed, the same latent vector as sample i of
`trainer.evaluate` with eval.seed equal to --seed. `--bn-stats batch` samples with BatchNorm's batch
statistics (G in train mode, as the classic loop's grids) instead of its running statistics.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.core.checkpoint import add_checkpoint_arguments, checkpoint_config, find_checkpoint, load_generator
from trainer.core.config import program_name
from trainer.core.data import to_uint8
from trainer.quality.fid import add_bn_stats_argument, latents
from trainer.util.atomic import publish_dir, temporary_name, write_atomic
from trainer.util.errors import UserError

GRID_FORMATS = (".png",)
INTERPOLATION_FORMATS = (".png", ".gif")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program_name("dcgan-sample", "python -m trainer.sample"),
        description="Write samples of a checkpoint's generator: a PNG grid, an .npz of uint8 images, or a folder of PNGs.",
        epilog="example: python -m trainer.sample runs/dcgan_cifar10 --out samples.png --num 64 --seed 0",
    )
    add_checkpoint_arguments(parser)
    parser.add_argument(
        "--out", required=True, help="*.png (grid), *.npz (uint8 array), *.gif (with --interpolate) or a new folder"
    )
    parser.add_argument("--num", type=int, help="images (default 64), or pairs with --interpolate (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="latent seed (default 0)")
    parser.add_argument("--interpolate", type=int, metavar="STEPS", help="latent interpolations of STEPS images each")
    parser.add_argument("--nrow", type=int, default=8, help="images per grid row (default 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it is an existing file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_bn_stats_argument(parser)
    return parser.parse_args(argv)


def _check_output(args: argparse.Namespace) -> tuple[Path, str]:
    """(path, kind) with kind one of grid, npz, folder, gif; refuses before any work is done."""
    out = Path(args.out)
    suffix = out.suffix.lower()
    if args.interpolate is not None:
        if args.interpolate < 2:
            raise UserError(f"--interpolate {args.interpolate}: give at least 2 steps, e.g. --interpolate 10")
        if suffix not in INTERPOLATION_FORMATS:
            raise UserError(f"--out {args.out}: interpolations are written as .png (grid) or .gif")
    elif suffix == ".gif":
        raise UserError(f"--out {args.out}: a GIF holds interpolations; add --interpolate STEPS, or use .png / .npz")
    if args.num is not None and args.num < 1:
        raise UserError(f"--num {args.num} must be at least 1")
    if args.nrow < 1:
        raise UserError(f"--nrow {args.nrow} must be at least 1")
    kind = {".png": "grid", ".npz": "npz", ".gif": "gif"}.get(suffix, "folder")
    if kind == "folder" and suffix:
        raise UserError(f"--out {args.out}: unknown format {suffix}; use .png, .npz, a folder name, or .gif")
    if kind == "folder":
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"--out {args.out} exists and is not an empty folder; give a new folder")
    elif out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it, or another --out")
    return out, kind


@torch.no_grad()
def generate(
    generator: torch.nn.Module, z: torch.Tensor, device: str, batch: int = 256, bn_stats: str = "running"
) -> torch.Tensor:
    """uint8 images (N, 3, H, W) on the CPU.

    bn_stats `batch`: a copy of G in train mode normalises each batch of `batch` latents by its own
    statistics (a grid of up to `batch` images is one batch, as in the classic loop). A copy, because
    a train-mode forward updates the running statistics, and the caller's generator must keep them.
    """
    if bn_stats == "batch":
        generator = copy.deepcopy(generator).to(device).train()
    else:
        generator = generator.to(device).eval()
    return torch.cat([to_uint8(generator(chunk.to(device))).cpu() for chunk in z.split(batch)])


def _grid(images: torch.Tensor, nrow: int) -> Image.Image:
    from torchvision.utils import make_grid

    return Image.fromarray(make_grid(images, nrow=nrow, padding=2).permute(1, 2, 0).numpy())


def _hwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def write_samples(images: torch.Tensor, out: Path, kind: str, nrow: int) -> None:
    if kind == "grid":
        write_atomic(out, lambda tmp: _grid(images, nrow).save(tmp, format="PNG"))
    elif kind == "npz":

        def write_npz(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, _hwc(images))

        write_atomic(out, write_npz)
    else:  # a folder, filled under a temporary name and renamed into place
        tmp = temporary_name(out)
        tmp.mkdir(parents=True)
        try:
            for i, image in enumerate(_hwc(images)):
                Image.fromarray(image).save(tmp / f"{i:06d}.png")
            if out.exists():
                out.rmdir()  # checked empty in _check_output
            publish_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def write_interpolations(frames: torch.Tensor, out: Path, kind: str, nrow: int) -> None:
    """`frames`: (pairs, steps, 3, H, W) uint8."""
    pairs, steps = frames.shape[:2]
    if kind == "grid":
        write_atomic(out, lambda tmp: _grid(frames.flatten(0, 1), steps).save(tmp, format="PNG"))
    else:
        grids = [_grid(frames[:, k], nrow) for k in range(steps)]
        write_atomic(
            out,
            lambda tmp: grids[0].save(tmp, format="GIF", save_all=True, append_images=grids[1:], duration=100, loop=0),
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out, kind = _check_output(args)
        checkpoint = find_checkpoint(args.target, args.best)
        cfg = checkpoint_config(checkpoint)
        generator, weights = load_generator(checkpoint, cfg.model, args.raw)
        nz = cfg.model.nz
        if args.interpolate is None:
            num = args.num or 64
            images = generate(generator, latents(args.seed, range(num), nz), args.device, bn_stats=args.bn_stats)
            write_samples(images, out, kind, args.nrow)
            what = f"{num} samples"
        else:
            from torch_fidelity.noise import batch_slerp_any

            num, steps = args.num or 8, args.interpolate
            start, end = latents(args.seed, range(num), nz), latents(args.seed, range(num, 2 * num), nz)
            z = torch.stack([batch_slerp_any(start, end, t) for t in torch.linspace(0, 1, steps).tolist()], dim=1)
            frames = generate(generator, z.flatten(0, 1), args.device, bn_stats=args.bn_stats).unflatten(
                0, (num, steps)
            )
            write_interpolations(frames, out, kind, args.nrow)
            what = f"{num} interpolations of {steps} steps"
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(
        f"wrote {what} ({weights} generator of {checkpoint}, seed {args.seed}, {args.bn_stats} BN statistics) to {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
