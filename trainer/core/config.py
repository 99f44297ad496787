"""Typed run configuration: dataclass schema, YAML files, dotted command-line overrides.

OmegaConf structured configs do the parsing, merging and type checks; this module turns their
exceptions into one-line errors that name the key and the fix (``ConfigError``, exit code 2).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from trainer.util.errors import ConfigError


@dataclass
class RunConfig:
    name: str = "dcgan"
    dir: str = "runs/${run.name}"  # where the run writes: config, checkpoints, samples, weights
    seed: int = 0
    resume: str = "auto"  # auto | never | path to a checkpoint directory


@dataclass
class DataConfig:
    source: Literal["cifar10", "folder", "fake"] = "cifar10"
    root: str = "data/cifar10"
    download: bool = True
    num_workers: int = 2
    fake_size: int = 1024  # number of images of the `fake` source
    packed: bool = True  # decode once into a memory-mapped uint8 cache; false: classic per-sample PIL loading
    cache_dir: str | None = None  # packed cache location; default $XDG_CACHE_HOME/dcgan-trainer/packed
    bad_files: Literal["error", "skip"] = "error"  # unreadable files in a `folder` source: stop, or skip them
    # true when data.cache_dir is on node-local disks: each node's first process then builds its own
    # pack; false (default): one process builds it for the whole job on a filesystem all nodes share
    cache_per_node: bool = False


@dataclass
class ModelConfig:
    resolution: int = 64
    nz: int = 100
    ngf: int = 64
    ndf: int = 64


@dataclass
class TrainConfig:
    batch_size: int = 64  # GLOBAL batch, split evenly over processes
    epochs: int = 25
    max_steps: int | None = None  # cap on optimizer steps (G and D each step once per step)
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    # str, not Literal: YAML reads a bare `no` as false, which must still mean "no"
    # auto: bf16 on GPUs that have it (compute capability 8.0+), fp16 on older GPUs, and on CPUs bf16
    # only with AMX (elsewhere CPU bf16 is slower than fp32, so no)
    mixed_precision: str = "auto"  # auto | no | fp16 | bf16
    sync_bn: str = "auto"  # auto | true | false (YAML booleans accepted)
    channels_last: bool = True  # NHWC models and batches (faster convolutions on CPU and GPU)
    compile: bool = False  # torch.compile G and D (inductor); see docs/performance.md for when it pays
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"  # reduce-overhead: CUDA graphs
    on_nonfinite: Literal["stop", "rollback"] = "stop"  # NaN/inf losses: stop, or reload the newest checkpoint
    max_rollbacks: int = 3  # with on_nonfinite=rollback: give up (stop) after this many
    # EMA of the generator's weights (e.g. 0.999), used for evaluation and samples; null or 0: off (classic)
    ema_decay: float | None = None


@dataclass
class CkptConfig:
    every_steps: int = 500
    keep: int = 3


@dataclass
class LogConfig:
    every_steps: int = 50
    sample_every_steps: int = 500
    sample_grid_size: int = 64  # images in each fixed-noise grid
    tracker: Literal["wandb", "tensorboard", "none"] = "wandb"  # dashboards, from rank 0 (trainer/monitor/tracking.py)
    wandb_project: str = "dcgan-trainer"
    wandb_entity: str | None = None  # W&B user or team; default: the account's default entity
    wandb_tags: list[str] = field(default_factory=list)
    wandb_group: str | None = None  # default: $SLURM_JOB_ID when set
    wandb_mode: Literal["auto", "online", "offline"] = "auto"  # auto: online with credentials, offline without


@dataclass
class EvalConfig:
    """FID / IS / KID during training and in `python -m trainer.evaluate` (trainer/quality/fid.py)."""

    every_epochs: int | None = 5  # evaluate every N epochs and at the end; null (with every_steps null): off
    every_steps: int | None = None  # or every N steps
    num_samples: int = 10000  # generated images per evaluation (50000 for the standard protocol)
    batch_size: int = 250  # images per forward pass on each process (generation and features)
    seed: int = 0  # latent i of every evaluation depends only on (eval.seed, i)
    # a torch-fidelity feature extractor name, or module:Class of a registered FeatureExtractorBase subclass
    feature_extractor: str = "inception-v3-compat"
    feature_extractor_weights: str | None = None  # local weights file for clusters without internet
    split: str = "train"  # real images to compare with: train | test (test: cifar10 only)
    num_real: int | None = None  # real images in the reference statistics; null: the whole split
    cache_dir: str | None = None  # reference statistics cache; null: $XDG_CACHE_HOME/dcgan-trainer or ~/.cache/...
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # capped at the number of real and generated images


@dataclass
class DistConfig:
    # Seconds a collective may wait before the process group gives up (NCCL's own default is 600).
    # One-time preparation happens outside collectives (trainer.prepare), so this only bounds waits
    # inside training: checkpoints, evaluation, stop checks.
    timeout_s: int = 1800


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)


def user_cache_dir(kind: str) -> Path:
    """Default of data.cache_dir / eval.cache_dir: $XDG_CACHE_HOME (or ~/.cache)/dcgan-trainer/<kind>."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dcgan-trainer" / kind


def _first_line(exc: OmegaConfBaseException) -> str:
    return str(getattr(exc, "msg", None) or exc).splitlines()[0]


def _merge(base: DictConfig, layer: DictConfig, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except ConfigKeyError as exc:
        key = exc.full_key or "?"
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(base, parent) if parent else base
        valid = ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else "none"
        raise ConfigError(
            f"unknown config key '{key}' ({origin}); valid keys{' under ' + repr(parent) if parent else ''}: {valid}"
        ) from None
    except OmegaConfBaseException as exc:
        key = exc.full_key or "?"
        default = OmegaConf.select(OmegaConf.structured(Config), key, default=None)
        hint = f"; e.g. {key}={default}" if default is not None else ""
        raise ConfigError(f"bad value for '{key}' ({origin}): {_first_line(exc)}{hint}") from None


def load_config(config_file: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults <- YAML file <- dotted overrides, validated. Raises ConfigError."""
    merged = OmegaConf.structured(Config)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(
                f"config file not found: {config_file}; pass an existing YAML, e.g. --config configs/smoke.yaml"
            )
        try:
            layer = OmegaConf.load(path)
        except Exception as exc:  # yaml.YAMLError and friends
            raise ConfigError(f"cannot parse {config_file}: {str(exc).splitlines()[0]}") from None
        merged = _merge(merged, layer, f"in {config_file}")
    bad = [item for item in overrides if "=" not in item or item.startswith("=")]
    if bad:
        raise ConfigError(f"override '{bad[0]}' is not of the form key=value, e.g. train.epochs=5")
    try:
        layer = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {_first_line(exc)}") from None
    merged = _merge(merged, layer, "on the command line")
    try:
        cfg: Config = OmegaConf.to_object(merged)  # resolves ${run.name} in run.dir
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot resolve '{exc.full_key}': {_first_line(exc)}") from None
    validate(cfg)
    return cfg


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Checks that need no hardware knowledge; `runtime.check_against_hardware` does the rest."""
    precision = str(cfg.train.mixed_precision).lower()
    precision = "no" if precision == "false" else precision
    _require(
        precision in ("auto", "no", "fp16", "bf16"),
        f"train.mixed_precision={cfg.train.mixed_precision!r} is not one of auto, no, fp16, bf16",
    )
    cfg.train.mixed_precision = precision
    sync_bn = str(cfg.train.sync_bn).lower()
    _require(
        sync_bn in ("auto", "true", "false"), f"train.sync_bn={cfg.train.sync_bn!r} is not one of auto, true, false"
    )
    cfg.train.sync_bn = sync_bn

    res = cfg.model.resolution
    _require(
        16 <= res <= 256 and res & (res - 1) == 0,
        f"model.resolution={res} is not supported; use a power of two from 16 to 256 (64 classic, 32 native CIFAR)",
    )
    for key in (
        "model.nz",
        "model.ngf",
        "model.ndf",
        "train.batch_size",
        "train.epochs",
        "ckpt.every_steps",
        "ckpt.keep",
        "log.every_steps",
        "log.sample_every_steps",
        "log.sample_grid_size",
        "data.fake_size",
        "dist.timeout_s",
    ):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _require(value >= 1, f"{key}={value} must be at least 1")
    _require(cfg.train.max_rollbacks >= 0, f"train.max_rollbacks={cfg.train.max_rollbacks} must be 0 or more")
    _require(cfg.data.num_workers >= 0, f"data.num_workers={cfg.data.num_workers} must be 0 or more")
    _require(
        cfg.train.max_steps is None or cfg.train.max_steps >= 1,
        f"train.max_steps={cfg.train.max_steps} must be at least 1, or null for no cap",
    )
    _require(math.isfinite(cfg.train.lr) and cfg.train.lr > 0, f"train.lr={cfg.train.lr} must be a positive number")
    _require(
        len(cfg.train.betas) == 2 and all(0.0 <= b < 1.0 for b in cfg.train.betas),
        f"train.betas={list(cfg.train.betas)} must be two numbers in [0, 1), e.g. train.betas=[0.5,0.999]",
    )
    decay = cfg.train.ema_decay
    _require(
        decay is None or 0.0 <= decay < 1.0,
        f"train.ema_decay={decay} must be in [0, 1), e.g. 0.999, or null (0 and null: no EMA)",
    )
    if decay == 0.0:
        cfg.train.ema_decay = None
    _require(
        bool(cfg.run.name) and "/" not in cfg.run.name,
        f"run.name={cfg.run.name!r} must be a non-empty name without '/'",
    )
    _require(bool(cfg.run.resume), "run.resume is empty; use auto, never, or a checkpoint directory")
    _require(
        bool(cfg.log.wandb_project) and "/" not in cfg.log.wandb_project,
        f"log.wandb_project={cfg.log.wandb_project!r} must be a non-empty name without '/'",
    )
    if cfg.data.source != "fake":
        _require(bool(cfg.data.root), f"data.root is empty; data.source={cfg.data.source} needs a directory")
    _validate_eval(cfg)


def _validate_eval(cfg: Config) -> None:
    ev = cfg.eval
    for key in ("every_epochs", "every_steps", "num_real"):
        value = getattr(ev, key)
        _require(value is None or value >= 1, f"eval.{key}={value} must be at least 1, or null")
    for key in ("batch_size", "kid_subsets"):
        _require(getattr(ev, key) >= 1, f"eval.{key}={getattr(ev, key)} must be at least 1")
    # Inception Score splits the samples into 10 parts; FID needs a covariance (2+) and KID subsets (2+).
    _require(ev.num_samples >= 10, f"eval.num_samples={ev.num_samples} must be at least 10 (10000 is usual)")
    _require(ev.kid_subset_size >= 2, f"eval.kid_subset_size={ev.kid_subset_size} must be at least 2")
    _require(ev.seed >= 0, f"eval.seed={ev.seed} must be 0 or more")
    _require(ev.split in ("train", "test"), f"eval.split={ev.split!r} is not one of train, test")
    _require(
        ev.split == "train" or cfg.data.source == "cifar10",
        f"eval.split=test needs data.source=cifar10; for data.source={cfg.data.source} point data.root "
        "at the folder to compare with and keep eval.split=train",
    )
    _require(
        bool(ev.feature_extractor), "eval.feature_extractor is empty; e.g. eval.feature_extractor=inception-v3-compat"
    )


def evaluation_enabled(cfg: Config) -> bool:
    return cfg.eval.every_epochs is not None or cfg.eval.every_steps is not None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        prog="trainer/train.py",
        description="Train a DCGAN. Settings: schema defaults <- --config YAML <- key=value overrides.",
        epilog="example: accelerate launch trainer/train.py --config configs/dcgan_cifar10.yaml train.epochs=5",
    )
    parser.add_argument("--config", help="YAML file in configs/ (default: the schema defaults, the classic recipe)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")
    args = parser.parse_intermixed_args(argv)
    return load_config(args.config, args.overrides)
