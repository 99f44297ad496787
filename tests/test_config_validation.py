"""Every check of trainer/core/config.py that tests/test_config.py and tests/test_metrics.py leave out:
each bad setting is refused with one line that names the key (ConfigError, exit code 2)."""

from __future__ import annotations

import pytest

from tests.conftest import SMOKE
from trainer.core.config import load_config
from trainer.util.errors import ConfigError

AT_LEAST_ONE = [
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
]


def _refused(overrides: list[str], config: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(config, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("key", AT_LEAST_ONE)
def test_sizes_and_intervals_must_be_at_least_one(key):
    assert f"{key}=0 must be at least 1" in _refused([f"{key}=0"])
    load_config(None, [f"{key}=1"])  # the boundary itself is fine


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.resolution=8", "model.resolution=8 is not supported"),
        ("model.resolution=512", "model.resolution=512 is not supported"),
        ("train.max_rollbacks=-1", "train.max_rollbacks=-1 must be 0 or more"),
        ("data.num_workers=-1", "data.num_workers=-1 must be 0 or more"),
        ("train.max_steps=0", "train.max_steps=0 must be at least 1, or null"),
        ("train.lr=0", "train.lr=0.0 must be a positive number"),
        ("train.lr=-0.001", "train.lr=-0.001 must be a positive number"),
        ("train.lr=nan", "train.lr=nan must be a positive number"),
        ("train.lr=inf", "train.lr=inf must be a positive number"),
        ("train.betas=[0.5,1.0]", "train.betas=[0.5, 1.0] must be two numbers in [0, 1)"),
        ("train.betas=[-0.1,0.9]", "must be two numbers in [0, 1)"),
        ("train.betas=[0.5,0.9,0.99]", "must be two numbers in [0, 1)"),
        ('run.name=""', "run.name='' must be a non-empty name"),
        ("run.name=a/b", "run.name='a/b' must be a non-empty name without '/'"),
        ('run.resume=""', "run.resume is empty"),
        ('log.wandb_project=""', "log.wandb_project='' must be a non-empty name"),
        ("log.wandb_project=team/project", "log.wandb_project='team/project'"),
        ("train.ema_decay=-0.5", "train.ema_decay=-0.5 must be in [0, 1)"),
        ("eval.every_steps=0", "eval.every_steps=0 must be at least 1, or null"),
        ("eval.num_real=0", "eval.num_real=0 must be at least 1, or null"),
        ("eval.batch_size=0", "eval.batch_size=0 must be at least 1"),
        ("eval.kid_subsets=0", "eval.kid_subsets=0 must be at least 1"),
        ("eval.kid_subset_size=1", "eval.kid_subset_size=1 must be at least 2"),
        ("eval.seed=-1", "eval.seed=-1 must be 0 or more"),
        ('eval.feature_extractor=""', "eval.feature_extractor is empty"),
        ("=5", "override '=5' is not of the form key=value"),
        ("run.dir=${nope}", "cannot resolve 'run.dir'"),
    ],
)
def test_bad_value_is_refused_naming_the_key(override, needle):
    assert needle in _refused([override])


def test_data_root_is_needed_except_for_fake_images():
    for source in ("cifar10", "folder"):
        assert f"data.root is empty; data.source={source} needs a directory" in _refused(
            [f"data.source={source}", 'data.root=""']
        )
    assert load_config(None, ["data.source=fake", 'data.root=""']).data.root == ""


def test_boundaries_that_are_allowed():
    cfg = load_config(
        None,
        [
            "train.max_rollbacks=0",
            "data.num_workers=0",
            "train.max_steps=null",
            "train.betas=[0.0,0.0]",
            "train.ema_decay=null",
            "eval.every_steps=null",
            "eval.kid_subset_size=2",
            "eval.seed=0",
            "model.resolution=16",
        ],
    )
    assert cfg.train.max_steps is None and cfg.model.resolution == 16
    assert load_config(None, ["model.resolution=256"]).model.resolution == 256


def test_config_file_missing_or_not_yaml(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert f"config file not found: {missing}" in _refused([], str(missing))
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    assert f"cannot parse {broken}" in _refused([], str(broken))
    assert "unknown config key" in _refused(["train.nope=1"], str(SMOKE))
