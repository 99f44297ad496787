"""Typed run configuration: dataclass schema, YAML files, dotted command-line overrides.

OmegaConf structured configs do the parsing, merging and type checks; this module turns their
exceptions into one-line errors that name the key and the fix (``ConfigError``, exit code 2).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import shlex
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from trainer.util.errors import ConfigError
from trainer.util.ranks import launch_rank


def setting(default: Any, help: str, *, fixed_on_resume: bool = False) -> Any:
    """One config key: its default, what it means, and whether a resumed run may change it.

    The help text is the one source of the key's meaning: `--help` lists it (`describe_keys`), and
    docs/configuration.md is generated from it (`describe_markdown`, python -m tools.config_docs). `fixed_on_resume` marks keys that change the training
    trajectory (model, data, optimiser, precision, seed): resuming a checkpoint with a different
    value is refused unless run.resume_changes=allow (`core/checkpoint.py`).
    """
    metadata = {"help": help, "fixed_on_resume": fixed_on_resume}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """What a run is called, where it writes, and how it resumes (docs/resume.md)."""

    name: str = setting("dcgan_cifar10", "run name; run.dir defaults to runs/<name>")
    dir: str = setting("runs/${run.name}", "where the run writes: config, checkpoints, samples, weights")
    seed: int = setting(
        0, "weights init, data order, noise; every rank builds the same initial weights", fixed_on_resume=True
    )
    resume: str = setting(
        "auto",
        "auto (newest complete checkpoint in run.dir, else start), never (refuse if run.dir has checkpoints), "
        "or a checkpoint directory",
    )
    resume_changes: Literal["refuse", "allow"] = setting(
        "refuse",
        "a resume whose config changes a trajectory key (marked *) from the checkpoint's: refuse (exit 2, "
        "listing them) or allow",
    )


@dataclass
class DataConfig:
    """Where the images come from and how they are loaded (docs/data.md)."""

    # The names of trainer/core/data.py's SOURCES (tests/test_data.py checks that they agree).
    source: Literal["cifar10", "cifar100", "folder", "fake"] = setting(
        "cifar10",
        "cifar10 or cifar100 (torchvision), folder (every image under data.root, e.g. an ImageFolder tree), "
        "fake (generated, for tests)",
        fixed_on_resume=True,
    )
    root: str = setting("data/cifar10", "dataset directory", fixed_on_resume=True)
    download: bool = setting(True, "let torchvision download CIFAR-10 (or CIFAR-100) into data.root")
    num_workers: int = setting(2, "loader worker processes per rank")
    fake_size: int = setting(1024, "images in the fake source", fixed_on_resume=True)
    packed: bool = setting(
        True,
        "decode the dataset once into a memory-mapped uint8 cache and resize on the device; false: the classic "
        "per-sample PIL loader",
        fixed_on_resume=True,
    )
    cache_dir: str | None = setting(
        None, "where packed datasets live; null: $XDG_CACHE_HOME/dcgan-trainer/packed (default ~/.cache/...)"
    )
    bad_files: Literal["error", "skip"] = setting(
        "error", "unreadable files in a folder source: error (stop before training) or skip", fixed_on_resume=True
    )
    cache_per_node: bool = setting(
        False,
        "true when data.cache_dir is on node-local disks: each node's first process builds its own pack; "
        "false: one process builds it for the whole job, on a filesystem every node sees",
    )


@dataclass
class ModelConfig:
    """The DCGAN networks: G of transposed convolutions, D of strided convolutions, BatchNorm."""

    resolution: int = setting(64, "image size, a power of two from 16 to 256", fixed_on_resume=True)
    nz: int = setting(100, "latent size", fixed_on_resume=True)
    ngf: int = setting(64, "generator width", fixed_on_resume=True)
    ndf: int = setting(64, "discriminator width", fixed_on_resume=True)


@dataclass
class TrainConfig:
    """The optimisation: batch, schedule, Adam, precision, normalisation, compilation, divergence, EMA."""

    batch_size: int = setting(64, "the GLOBAL batch, split evenly over processes", fixed_on_resume=True)
    epochs: int = setting(25, "epochs to train")
    max_steps: int | None = setting(None, "optional cap on optimizer steps (one D and one G update per step)")
    lr: float = setting(2e-4, "Adam learning rate, both nets", fixed_on_resume=True)
    betas: list[float] = setting([0.5, 0.999], "Adam betas, both nets", fixed_on_resume=True)
    # The names of trainer/core/step.py's LOSSES (tests/test_step.py checks that they agree).
    loss: Literal["bce", "hinge"] = setting(
        "bce",
        "the GAN loss: bce (the classic recipe's: binary cross-entropy, non-saturating G loss; logs D(x), D(G(z))) "
        "or hinge (D: relu(1 - D(x)) + relu(1 + D(G(z))), G: -D(G(z)); logs D's mean logits)",
        fixed_on_resume=True,
    )
    # str, not Literal: YAML reads a bare `no` as false, which must still mean "no"
    mixed_precision: str = setting(
        "auto",
        "auto: bf16 on GPUs with compute capability 8.0+ (A100, H100), fp16 on older GPUs, on CPUs bf16 only with AMX "
        "(else no, since CPU bf16 is slower than fp32 without it: docs/performance.md); no; fp16 (GPU; grad scaler, "
        "skipped steps counted); bf16. The only precision setting: it overrides accelerate launch --mixed_precision",
        fixed_on_resume=True,
    )
    sync_bn: str = setting(
        "auto",
        "auto: SyncBatchNorm on multi-process CUDA runs, BatchNorm otherwise; true (CUDA only) / false",
        fixed_on_resume=True,
    )
    channels_last: bool = setting(True, "NHWC models and batches (faster convolutions on CPU and GPU)")
    compile: bool = setting(False, "torch.compile G and D (inductor, after the DDP wrap); see docs/performance.md")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = setting(
        "default", "torch.compile mode; reduce-overhead adds CUDA graphs"
    )
    on_nonfinite: Literal["stop", "rollback"] = setting(
        "stop", "NaN/inf losses: stop, or rollback to the newest checkpoint"
    )
    max_rollbacks: int = setting(3, "with on_nonfinite=rollback: give up (stop) after this many")
    ema_decay: float | None = setting(
        None,
        "e.g. 0.999: keep an EMA of G's weights for grids, evaluation and sampling; null or 0: off (the classic recipe)",
        fixed_on_resume=True,
    )


@dataclass
class CkptConfig:
    """Checkpoints (docs/resume.md)."""

    every_steps: int = setting(500, "checkpoint interval (also at every epoch end and on a clean stop)")
    keep: int = setting(3, "complete checkpoints kept (the best one is kept besides)")


@dataclass
class LogConfig:
    """The console, metrics.jsonl, sample grids and the dashboard (docs/tracking.md)."""

    every_steps: int = setting(
        50,
        "console line, metrics.jsonl record and dashboard row (besides a one-number stop/health check every 10 "
        "steps, the loop's only host sync)",
    )
    sample_every_steps: int = setting(500, "fixed-noise grid interval (also at every epoch end)")
    sample_grid_size: int = setting(64, "images in each fixed-noise grid")
    tracker: Literal["wandb", "tensorboard", "none"] = setting(
        "wandb", "dashboards from rank 0: wandb, tensorboard (needs pip install tensorboard), none"
    )
    wandb_project: str = setting("dcgan-trainer", "W&B project")
    wandb_entity: str | None = setting(None, "W&B user or team; null: the account's default entity")
    wandb_tags: list[str] = setting([], "W&B tags, e.g. log.wandb_tags=[baseline,bf16]")
    wandb_group: str | None = setting(None, "W&B group, set at the run's first start; null: run.name")
    wandb_mode: Literal["auto", "online", "offline"] = setting(
        "auto",
        "auto (online with W&B credentials, offline without or when the online start fails), online, offline; "
        "WANDB_MODE is used when this is auto",
    )
    wandb_artifacts: Literal["none", "best", "final", "both"] = setting(
        "none",
        "generator weights (and EMA) as W&B model artifacts: at each new best FID (alias best), at the end "
        "(alias final), both, or none",
    )
    wandb_artifact_storage: Literal["auto", "upload", "reference"] = setting(
        "auto",
        "upload the artifact files, or reference them in place (file://, for a run.dir on a shared filesystem); "
        "auto: reference on NFS, Lustre, GPFS, BeeGFS, CephFS and the like, upload otherwise",
    )


@dataclass
class EvalConfig:
    """FID / IS / KID during training and in `python -m trainer.evaluate` (docs/evaluation.md)."""

    every_epochs: int | None = setting(
        5, "evaluate every N epochs during training and at the last step; null (with every_steps null): never"
    )
    every_steps: int | None = setting(None, "or every N steps")
    num_samples: int = setting(10000, "generated images per evaluation; 50000 for the standard protocol")
    batch_size: int = setting(250, "images per forward pass on each process (generation and features)")
    seed: int = setting(0, "the latents: sample i of every evaluation uses the same vector")
    feature_extractor: str = setting(
        "inception-v3-compat",
        "inception-v3-compat (torch-fidelity's InceptionV3, the standard FID; downloads its weights once), "
        "cifar10-classifier (this project's CIFAR-10 classifier, offline: train it with python -m "
        "tools.classifier train from a checkout and pass its file as eval.feature_extractor_weights; its IS is a classifier "
        "score), another torch-fidelity extractor name, or module:Class of a FeatureExtractorBase subclass",
    )
    feature_extractor_weights: str | None = setting(
        None, "a local weights file, for clusters without internet (docs/evaluation.md)"
    )
    split: str = setting("train", "real images to compare with: train (the training data) or test (cifar10 only)")
    num_real: int | None = setting(None, "real images in the reference statistics, a seeded subset; null: all")
    cache_dir: str | None = setting(
        None, "reference statistics; null: $XDG_CACHE_HOME/dcgan-trainer/reference-stats (default ~/.cache/...)"
    )
    kid_subsets: int = setting(100, "KID subsets")
    kid_subset_size: int = setting(1000, "images per KID subset (capped at the number of images)")


@dataclass
class DistConfig:
    """The process group (docs/distributed.md)."""

    # One-time preparation happens outside collectives (trainer.prepare), so this only bounds waits
    # inside training: checkpoints, evaluation, stop checks.
    timeout_s: int = setting(
        1800,
        "seconds a collective may wait before the process group gives up (NCCL's own default is 600); one-time "
        "preparation runs outside collectives (docs/data.md)",
    )


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


@dataclass(frozen=True)
class KeyInfo:
    """A config key as the schema declares it (what `--help` lists)."""

    key: str  # dotted: train.lr
    default: Any
    help: str
    fixed_on_resume: bool


def schema_keys(schema: type = Config, prefix: str = "") -> list[KeyInfo]:
    """Every key of the schema, in declaration order, with its default and meaning."""
    keys: list[KeyInfo] = []
    for f in fields(schema):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):  # a section
            keys.extend(schema_keys(type(default), f"{prefix}{f.name}."))
        else:
            fixed = bool(f.metadata.get("fixed_on_resume", False))
            keys.append(KeyInfo(f"{prefix}{f.name}", default, f.metadata.get("help", ""), fixed))
    return keys


def fixed_on_resume(key: str) -> bool:
    """Whether `key` (dotted) changes the training trajectory; keys the schema does not know are free."""
    return any(info.key == key and info.fixed_on_resume for info in schema_keys())


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


ENV_OVERRIDES = "DCGAN_OVERRIDES"


def _is_item_key(key: str) -> bool:
    """`train.betas.0`: a key that names one item of a list (its last part is an index)."""
    return "." in key and key.rsplit(".", 1)[1].isdigit()


def _apply_overrides(merged: DictConfig, items: list[str], origin: str) -> DictConfig:
    """`key=value` items onto the config. A key ending in an index sets one list item (`train.betas.0=0.3`:
    what a sweep over beta1 passes); OmegaConf's dotlist cannot address list items, its `update` can."""
    whole = [item for item in items if not _is_item_key(item.split("=", 1)[0])]
    try:
        layer = OmegaConf.from_dotlist(whole)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {whole} ({origin}): {_first_line(exc)}") from None
    merged = _merge(merged, layer, origin)
    for item in items:
        key, value = item.split("=", 1)
        if not _is_item_key(key):
            continue
        parent, index = key.rsplit(".", 1)
        node = OmegaConf.select(merged, parent, default=None)
        if not isinstance(node, ListConfig) or int(index) >= len(node):
            size = f"a list of {len(node)} items" if isinstance(node, ListConfig) else "not a list"
            raise ConfigError(
                f"'{key}' ({origin}) names item {index} of '{parent}', which is {size}; "
                "e.g. train.betas.0=0.3 sets beta1"
            )
        try:
            OmegaConf.update(merged, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=False)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"bad value for '{key}' ({origin}): {_first_line(exc)}") from None
    return merged


def load_config(config_file: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults <- YAML file <- dotted overrides <- $DCGAN_OVERRIDES, validated. Raises ConfigError.

    $DCGAN_OVERRIDES holds `key=value` overrides (shell-quoted, space-separated) applied after the
    command line's, by every tool that reads a config: site-wide settings on a cluster, or the
    docs test's tiny settings (tests/test_readme.py). A key may end in a list index:
    `train.betas.0=0.3` sets the first item.
    """
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
    merged = _apply_overrides(merged, list(overrides), "on the command line")
    from_env = os.environ.get(ENV_OVERRIDES, "").strip()
    if from_env:
        try:
            env_items = shlex.split(from_env)
        except ValueError as exc:
            raise ConfigError(f"cannot parse ${ENV_OVERRIDES}={from_env!r}: {str(exc).splitlines()[0]}") from None
        bad = [item for item in env_items if "=" not in item or item.startswith("=")]
        if bad:
            raise ConfigError(f"${ENV_OVERRIDES}: '{bad[0]}' is not of the form key=value, e.g. train.epochs=5")
        merged = _apply_overrides(merged, env_items, f"in ${ENV_OVERRIDES}")
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
    # Imported here, not at the top: importing the config stays free of torch (trainer.core.data's
    # table of sources brings it), and the data module does not import this one.
    from trainer.core.data import SOURCES

    source = SOURCES[cfg.data.source]
    if source.needs_root:
        _require(bool(cfg.data.root), f"data.root is empty; data.source={cfg.data.source} needs a directory")
    _validate_eval(cfg)
    with_test_set = ", ".join(name for name, s in SOURCES.items() if s.test_set)
    _require(
        cfg.eval.split == "train" or source.test_set is not None,
        f"eval.split=test needs a source with a held-out set ({with_test_set}); for data.source={cfg.data.source} "
        "point data.root at the folder to compare with and keep eval.split=train",
    )


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
        bool(ev.feature_extractor), "eval.feature_extractor is empty; e.g. eval.feature_extractor=inception-v3-compat"
    )


def evaluation_enabled(cfg: Config) -> bool:
    return cfg.eval.every_epochs is not None or cfg.eval.every_steps is not None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config (or any mapping) as dotted keys: {"train.lr": 0.0002, ...}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_keys(cfg: Config) -> dict[str, Any]:
    """The keys whose value differs from the schema default, dotted, in schema order: what a start prints
    (config.yaml holds them all). run.dir counts as changed only when it is not runs/<run.name>."""
    default = flatten(OmegaConf.to_container(OmegaConf.structured(Config), resolve=True))  # type: ignore[arg-type]
    default["run.dir"] = f"runs/{cfg.run.name}"  # the schema's runs/${run.name}, for this run's name
    return {key: value for key, value in flatten(to_dict(cfg)).items() if default.get(key) != value}


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def _format_default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def describe_keys(width: int = 118) -> str:
    """Every config key with its default and meaning, from the schema: the body of `--help`."""
    keys = schema_keys()
    key_width = max(len(k.key) for k in keys) + 2
    default_width = min(max(len(_format_default(k.default)) for k in keys), 20) + 2
    indent = " " * (2 + key_width + default_width)
    lines = ["config keys (key=value; * = fixed on resume unless run.resume_changes=allow):"]
    section = None
    for info in keys:
        if info.key.split(".")[0] != section:
            section = info.key.split(".")[0]
            lines.append("")
        default = _format_default(info.default)
        head = f"  {info.key + ('*' if info.fixed_on_resume else ''):<{key_width}}{default:<{default_width}}"
        if len(default) >= default_width:  # a long default gets its own line
            lines.append(head.rstrip())
            head = indent
        wrapped = textwrap.wrap(info.help, width=max(width - len(indent), 40)) or [""]
        lines.append(head + wrapped[0])
        lines.extend(indent + more for more in wrapped[1:])
    return "\n".join(lines)


def describe_markdown() -> str:
    """Every config key as Markdown, a table per section: the generated part of docs/configuration.md."""
    escape = str.maketrans({"|": "\\|", "*": "\\*", "<": "&lt;", ">": "&gt;"})  # table cells, not markup
    lines: list[str] = []
    section = None
    for info in schema_keys():
        name = info.key.split(".")[0]
        if name != section:
            section = name
            doc = " ".join((Config.__dataclass_fields__[name].default_factory.__doc__ or "").split())
            lines += ["", f"### `{name}`", "", doc, "", "| key | default | meaning |", "|---|---|---|"]
        key = f"`{info.key}`" + (" \\*" if info.fixed_on_resume else "")
        lines.append(f"| {key} | `{_format_default(info.default)}` | {info.help.translate(escape)} |")
    return "\n".join(lines).lstrip("\n") + "\n"


TRAIN_DESCRIPTION = (
    "Train a DCGAN. One process as it stands; for several, use "
    "`accelerate launch trainer/train.py ...` or `accelerate launch -m trainer.train ...`."
)


def build_parser(prog: str = "dcgan-train", description: str = TRAIN_DESCRIPTION) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=textwrap.fill(
            f"{description} Settings: schema defaults (the classic recipe) <- --config YAML <- key=value "
            f"overrides <- ${ENV_OVERRIDES}.",
            width=100,
        ),
        epilog=describe_keys()
        + "\n\nexamples:\n  dcgan-train --config configs/dcgan_cifar10.yaml train.epochs=5 --print-config\n"
        "  accelerate launch --multi_gpu --num_processes 8 trainer/train.py --config configs/dcgan_cifar10.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file, e.g. configs/dcgan_cifar10.yaml (default: the schema defaults)")
    parser.add_argument(
        "--print-config", action="store_true", help="resolve and validate the config, print it as YAML, exit"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. train.lr=1e-4 (also --train.lr=1e-4, the form a W&B sweep agent passes); "
        "a list item by its index: train.betas.0=0.3",
    )
    return parser


def _dashed_overrides(argv: list[str]) -> list[str]:
    """`--train.lr=1e-4` and `--train.lr 1e-4` (what W&B agents pass for ${args} and ${args_no_equals}) as
    `train.lr=1e-4`. Config keys are dotted, so no option of ours (--config, --print-config) is taken."""
    out: list[str] = []
    items = iter(argv)
    for item in items:
        key = item[2:].split("=", 1)[0]
        if item.startswith("--") and "." in key and not key.startswith("."):
            if "=" in item:
                out.append(item[2:])
            else:
                value = next(items, None)
                if value is None:
                    raise ConfigError(f"{item} has no value; write {key}=VALUE, e.g. train.lr=1e-4")
                out.append(f"{key}={value}")
        else:
            out.append(item)
    return out


def program_name(console_script: str, otherwise: str) -> str:
    """How --help names a tool: its console script (pyproject.toml) when run as one, else `otherwise`."""
    return console_script if Path(sys.argv[0]).name == console_script else otherwise


def parse_args(argv: list[str] | None = None, prog: str | None = None, description: str = TRAIN_DESCRIPTION) -> Config:
    """The config of a training command line. `--help` and `--print-config` print and exit 0 (SystemExit)."""
    prog = prog or program_name("dcgan-train", "trainer/train.py")
    argv = _dashed_overrides(sys.argv[1:] if argv is None else list(argv))
    args = build_parser(prog, description).parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        if launch_rank() == 0:  # one copy under accelerate launch
            print(to_yaml(cfg), end="", flush=True)
        raise SystemExit(0)
    return cfg
