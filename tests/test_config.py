"""trainer/core/config.py and the command line: the schema, YAML files, overrides, every validation
error (one line naming the key, exit code 2), `--help`, `--print-config` and the entry points."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, SMOKE, run_trainer, smoke_args
from trainer.core.config import ENV_OVERRIDES, Config, load_config, schema_keys, to_yaml
from trainer.train import main as train_main
from trainer.util.errors import ConfigError


# ---- the schema and the shipped configs --------------------------------------------------------------
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


# ---- validation: one line naming the key -------------------------------------------------------------
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


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.ema_decay=1.0", "train.ema_decay=1.0 must be in [0, 1)"),
        ("eval.num_samples=5", "eval.num_samples=5 must be at least 10"),
        ("eval.every_epochs=0", "eval.every_epochs=0 must be at least 1, or null"),
        ("eval.split=val", "eval.split='val' is not one of train, test"),
    ],
)
def test_bad_evaluation_settings_are_refused(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value)
    with pytest.raises(ConfigError, match=r"eval.split=test needs a source with a held-out set \(cifar10"):
        load_config(None, ["data.source=fake", "eval.split=test"])
    assert load_config(None, ["train.ema_decay=0"]).train.ema_decay is None  # 0 means off


# ---- the command line --------------------------------------------------------------------------------
SCRIPTS = {
    "dcgan-train": "trainer.train:main",
    "dcgan-evaluate": "trainer.evaluate:main",
    "dcgan-sample": "trainer.sample:main",
    "dcgan-export": "trainer.export:main",
    "dcgan-bench": "trainer.bench:main",
}


def _help(capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_key_with_its_default_and_meaning(capsys):
    out = _help(capsys)
    assert "--print-config" in out and "accelerate launch -m trainer.train" in out
    rows = {}
    for line in out.splitlines():
        match = re.match(r"^  ([a-z_]+\.[a-z_]+)(\*?)\s+(\S+)\s+(.*)$", line)
        if match:
            rows[match[1]] = (match[2] == "*", match[3], match[4])
    keys = schema_keys()
    assert list(rows) == [k.key for k in keys]  # every key, in schema order
    for key in keys:
        fixed, default, meaning = rows[key.key]
        assert meaning and key.help.startswith(meaning.split("  ")[0][:30]), key.key
        assert fixed == key.fixed_on_resume, key.key
    assert rows["train.lr"][:2] == (True, "0.0002") and rows["train.epochs"][:2] == (False, "25")
    assert rows["run.name"][1] == "dcgan_cifar10" and rows["train.betas"][1] == "[0.5,0.999]"
    assert rows["train.max_steps"][1] == "null" and rows["log.tracker"][1] == "wandb"
    assert "optional cap on optimizer steps" in out


def test_print_config_prints_the_resolved_validated_config_and_trains_nothing(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs" / "dcgan_cifar10.yaml")
    monkeypatch.setenv(ENV_OVERRIDES, "train.epochs=3 'log.wandb_tags=[a, b]'")
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", config, "train.lr=1e-4", "--print-config", "train.epochs=7"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    printed = OmegaConf.create(out)
    assert printed.train.lr == 1e-4 and printed.run.dir == "runs/dcgan_cifar10"  # resolved
    assert printed.train.epochs == 3 and list(printed.log.wandb_tags) == ["a", "b"]  # the variable wins
    assert out == to_yaml(load_config(config, ["train.lr=1e-4", "train.epochs=7"]))  # what training would use
    assert not list(tmp_path.iterdir())  # nothing written

    monkeypatch.delenv(ENV_OVERRIDES)
    assert train_main(["train.lr=-1", "--print-config"]) == 2  # validated: one line, exit 2
    assert capsys.readouterr().err.startswith("error: train.lr=-1.0 must be a positive number")
    monkeypatch.setenv(ENV_OVERRIDES, "train.epochz=3")
    assert train_main(["--print-config"]) == 2
    assert "unknown config key 'train.epochz' (in $DCGAN_OVERRIDES)" in capsys.readouterr().err


def test_console_scripts_are_declared_and_point_at_the_entry_points():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == SCRIPTS
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function))


def test_configuration_page_is_generated_from_the_schema_and_current():
    """docs/configuration.md's key tables are the schema's (python -m tools.config_docs); a stale page fails."""
    from tools import config_docs

    page = config_docs.PAGE.read_text()
    assert config_docs.render(page) == page, "docs/configuration.md is stale: run python -m tools.config_docs"
    missing = [k.key for k in schema_keys() if f"| `{k.key}`" not in page]
    assert not missing, f"docs/configuration.md lacks {missing}"
    fixed = {k.key for k in schema_keys() if k.fixed_on_resume}
    assert {line.split("`")[1] for line in page.splitlines() if line.startswith("| `") and " \\* |" in line} == fixed
    # a changed help text (or a new key) makes the page stale
    edited = page.replace("| Adam learning rate, both nets |", "| the learning rate |")
    assert edited != page and config_docs.render(edited) != edited
    assert config_docs.main(["--check"]) == 0
    # the default run directory is the one the README's commands use
    assert (
        load_config().run.dir
        == "runs/dcgan_cifar10"
        == load_config(str(REPO / "configs" / "dcgan_cifar10.yaml")).run.dir
    )


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
