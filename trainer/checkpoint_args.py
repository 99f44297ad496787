"""From a run directory or a checkpoint to the generator the tools use: EMA weights when there are some.

Shared by `python -m trainer.evaluate` and `python -m trainer.sample`; reads checkpoints written by
the loop (see checkpoint.py for the layout) and never writes to them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file

from trainer.core.checkpoint import BEST, CHECKPOINT_RE, MANIFEST, verify
from trainer.core.config import Config, load_config
from trainer.core.ema import EMA_FILE, GENERATOR_FILE
from trainer.core.models import Generator
from trainer.util.errors import CheckpointError


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """`target`, `--best` and `--raw`: which checkpoint and which generator, as `load_generator` reads them."""
    parser.add_argument("target", help="a run directory (its newest checkpoint) or a checkpoint directory")
    parser.add_argument("--best", action="store_true", help="the run's best checkpoint (lowest FID) instead")
    parser.add_argument("--raw", action="store_true", help="the raw generator even if the checkpoint has an EMA")


def find_checkpoint(target: str, best: bool = False) -> Path:
    """`target` itself if it is a checkpoint; in a run directory its newest intact checkpoint, or with
    `best` the one with the lowest FID. Raises CheckpointError."""
    path = Path(target)
    usage = "give a run directory (runs/<name>) or a checkpoint (runs/<name>/checkpoints/step-XXXXXXXX)"
    if (path / MANIFEST).is_file():
        if best:
            raise CheckpointError(f"--best needs a run directory, and {target} is a checkpoint; drop --best")
        checkpoint = path
    elif (path / "checkpoints").is_dir():
        directory = path / "checkpoints"
        if best:
            try:
                checkpoint = directory / json.loads((directory / BEST).read_text())["checkpoint"]
            except (OSError, ValueError, KeyError):
                raise CheckpointError(
                    f"{directory} has no best checkpoint record ({BEST}): the run evaluated nothing "
                    "(eval.every_epochs / eval.every_steps); drop --best"
                ) from None
        else:
            found = sorted(p for p in directory.iterdir() if CHECKPOINT_RE.match(p.name) and p.is_dir())
            intact = [p for p in found if verify(p) is None]
            if not intact:
                raise CheckpointError(f"{directory} holds no complete checkpoint; {usage}")
            checkpoint = intact[-1]
    else:
        raise CheckpointError(f"{target} is neither a run directory nor a checkpoint; {usage}")
    problem = verify(checkpoint)
    if problem:
        raise CheckpointError(f"checkpoint {checkpoint} is damaged ({problem}); pick another one")
    return checkpoint


def checkpoint_config(checkpoint: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config the checkpoint was trained with, plus `key=value` overrides (e.g. eval.num_samples=50000)."""
    return load_config(str(checkpoint / "config.yaml"), overrides)


def run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def load_generator(checkpoint: Path, cfg: Config, raw: bool = False) -> tuple[Generator, str]:
    """(generator in eval mode on the CPU, "ema" or "raw"): the EMA weights if the checkpoint has them
    and `raw` is not asked for."""
    use_ema = not raw and (checkpoint / EMA_FILE).is_file()
    model = cfg.model
    generator = Generator(model.nz, model.ngf, model.resolution)
    generator.load_state_dict(load_file(str(checkpoint / (EMA_FILE if use_ema else GENERATOR_FILE))))
    return generator.eval().requires_grad_(False), "ema" if use_ema else "raw"
