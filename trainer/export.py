"""`python -m trainer.export <run dir or checkpoint> --out DIR [--best]`

Write a checkpoint's weights as plain safetensors files that need no trainer to read:
`generator.safetensors` (G), `generator_ema.safetensors` (its EMA, when the run keeps one) and
`discriminator.safetensors` (D), each with the model settings (`model`) and the checkpoint's step
(`step`) in its metadata, the format of the files a run keeps beside `checkpoints/` (those are the
newest checkpoint's, refreshed with every checkpoint). Any checkpoint: the newest of a run
directory, the best with --best, or a checkpoint directory itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer.core.checkpoint import TRAIN_STATE, checkpoint_config, export_checkpoint, find_checkpoint
from trainer.core.config import program_name
from trainer.util.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program_name("dcgan-export", "python -m trainer.export"),
        description="Write a checkpoint's G, EMA and D weights as plain safetensors files (settings and step in the metadata).",
        epilog="example: python -m trainer.export runs/dcgan_cifar10 --best --out exported/",
    )
    parser.add_argument("target", help="a run directory (its newest checkpoint) or a checkpoint directory")
    parser.add_argument("--best", action="store_true", help="the run's best checkpoint (lowest FID) instead")
    parser.add_argument("--out", required=True, help="the folder to write into (created if needed)")
    parser.add_argument("--overwrite", action="store_true", help="replace weight files already in --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        checkpoint = find_checkpoint(args.target, args.best)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; give a folder")
        existing = [p.name for p in out.glob("*.safetensors")] if out.is_dir() else []
        if existing and not args.overwrite:
            raise UserError(
                f"--out {out} already holds {', '.join(sorted(existing))}; pass --overwrite or another --out"
            )
        step = json.loads((checkpoint / TRAIN_STATE).read_text())["step"]
        out.mkdir(parents=True, exist_ok=True)
        written = export_checkpoint(checkpoint, out, checkpoint_config(checkpoint).model, step)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"exported step {step} of {checkpoint}: " + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
