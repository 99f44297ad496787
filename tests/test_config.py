from pathlib import Path

import pytest

from tests.conftest import REPO, run_trainer, smoke_args
from trainer.core.config import Config, load_config
from trainer.util.errors import CheckpointError, ConfigError


def test_defaults_are_the_classic_recipe():
    cfg = load_config()
    assert (cfg.model.resolution, cfg.model.nz, cfg.model.ngf, cfg.model.ndf) == (64, 100, 64, 64)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.lr, cfg.train.betas) == (64, 25, 2e-4, [0.5, 0.999])
    assert cfg.run.dir == "runs/dcgan_cifar10" and cfg.run.resume == "auto" and cfg.train.max_steps is None


@pytest.mark.parametrize("name", ["dcgan_cifar10", "dcgan32_cifar10", "smoke"])
def test_shipped_configs_load(name):
    cfg = load_config(str(REPO / "configs" / f"{name}.yaml"))
    assert cfg.run.dir == f"runs/{cfg.run.name}"


def test_classic_config_is_the_schema_defaults_and_the_same_run():
    classic = load_config(str(REPO / "configs" / "dcgan_cifar10.yaml"))
    defaults = load_config()
    assert classic == defaults  # `make train` and --config configs/dcgan_cifar10.yaml: one run directory
    native = load_config(str(REPO / "configs" / "dcgan32_cifar10.yaml"))
    assert native.model.resolution == 32 and native.train == defaults.train


def test_yaml_bare_no_means_no_precision(tmp_path):
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  mixed_precision: no\n")
    assert load_config(str(f)).train.mixed_precision == "no"


def test_overrides_win_over_file_and_interpolate_run_dir():
    cfg = load_config(
        str(REPO / "configs" / "smoke.yaml"),
        ["train.epochs=5", "run.name=x", "train.sync_bn=true", "train.betas=[0.0,0.9]", "train.max_steps=7"],
    )
    assert cfg.train.epochs == 5 and cfg.run.dir == "runs/x" and cfg.train.sync_bn == "true"
    assert cfg.train.betas == [0.0, 0.9] and cfg.train.max_steps == 7
    assert isinstance(cfg, Config)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["train.epoch=3"], "unknown config key 'train.epoch'"),
        (["nope=1"], "unknown config key 'nope'"),
        (["train.epochs=ten"], "'train.epochs'"),
        (["train.lr=fast"], "'train.lr'"),
        (["train.mixed_precision=fp8"], "train.mixed_precision='fp8'"),
        (["data.source=imagenet"], "'data.source'"),
        (["train.sync_bn=maybe"], "train.sync_bn"),
        (["model.resolution=48"], "model.resolution=48"),
        (["train.batch_size=0"], "train.batch_size=0"),
        (["train.betas=[0.5]"], "train.betas"),
        (["train.epochs"], "key=value"),
    ],
)
def test_bad_values_raise_one_line_naming_the_key(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(str(REPO / "configs" / "smoke.yaml"), overrides)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_unknown_key_in_yaml_names_file_and_valid_keys(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batchsize: 32\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(bad))
    assert "train.batchsize" in str(info.value) and str(bad) in str(info.value) and "batch_size" in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, processes, needle",
    [
        (["train.epochs=abc"], 1, "train.epochs"),
        (["train.foo=1"], 1, "unknown config key 'train.foo'"),
        (["train.sync_bn=true"], 1, "train.sync_bn=true needs CUDA"),
        (["train.mixed_precision=fp16"], 1, "train.mixed_precision=fp16 needs a GPU"),
        (["train.batch_size=15"], 2, "train.batch_size=15 (the global batch) is not divisible by the 2 processes"),
    ],
)
def test_entry_point_exits_2_with_one_line(tmp_path, overrides, processes, needle):
    proc = run_trainer(smoke_args(tmp_path / "run", *overrides), processes=processes, check=False)
    assert proc.returncode != 0
    if processes == 1:
        assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_compares_configs_refuses_trajectory_keys_and_lets_schedule_keys_change(tmp_path, capsys):
    from omegaconf import OmegaConf

    from trainer.core.checkpoint import _check_config_changes, config_changes
    from trainer.core.config import schema_keys, to_dict

    saved = to_dict(load_config())
    free = load_config(None, ["train.epochs=50", "log.every_steps=10", "ckpt.keep=5", "eval.num_samples=50000"])
    assert [c[0] for c in config_changes(saved, free)] == [
        "train.epochs",
        "ckpt.keep",
        "log.every_steps",
        "eval.num_samples",
    ]
    _check_config_changes(tmp_path, saved, free)  # schedule, logging, checkpoints, evaluation: free
    assert "with config changes: train.epochs: 25 -> 50;" in capsys.readouterr().out

    for override in ("train.lr=1e-4", "data.root=elsewhere", "model.ngf=32", "train.mixed_precision=no", "run.seed=1"):
        with pytest.raises(CheckpointError, match="changes the training trajectory: " + override.split("=")[0]):
            _check_config_changes(tmp_path, saved, load_config(None, [override]))
    allowed = load_config(None, ["train.lr=1e-4", "run.resume_changes=allow"])
    _check_config_changes(tmp_path, saved, allowed)
    assert "(run.resume_changes=allow): train.lr: 0.0002 -> 0.0001" in capsys.readouterr().out
    # a config written before a key existed is not compared on that key
    older = OmegaConf.to_container(OmegaConf.create(saved))
    del older["log"]["wandb_artifacts"]
    assert config_changes(older, load_config(None, ["log.wandb_artifacts=best"])) == []
    fixed = {k.key for k in schema_keys() if k.fixed_on_resume}
    assert {"train.lr", "train.betas", "train.batch_size", "run.seed", "model.nz"} <= fixed
    assert not fixed & {"train.epochs", "train.max_steps", "data.num_workers", "data.cache_dir", "run.name"}
