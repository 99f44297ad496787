"""The command line: --help lists the schema, --print-config prints the resolved config, the entry points."""

from __future__ import annotations

import importlib
import re

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO
from trainer.core.config import ENV_OVERRIDES, load_config, schema_keys, to_yaml
from trainer.train import main as train_main

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
    # That `pip install -e .` installs them and that they run: tests/test_readme.py, whose README
    # blocks install the project into a fresh environment and call dcgan-train.


def test_readme_tables_name_every_config_key():
    readme = (REPO / "README.md").read_text()
    missing = [k.key for k in schema_keys() if f"`{k.key}`" not in readme]
    assert not missing, f"README tables lack {missing}"
    # the default run directory is the one the README's commands use
    assert (
        load_config().run.dir
        == "runs/dcgan_cifar10"
        == load_config(str(REPO / "configs" / "dcgan_cifar10.yaml")).run.dir
    )
