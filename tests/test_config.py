"""The one configuration: presets, --set overrides, one-line errors naming the key, and the run directory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from medsyngan.config import CONFIG_DIR, config_from_toml_text, load_config
from medsyngan.errors import UserError
from medsyngan.rundir import RunDir


def test_every_preset_loads_and_round_trips_through_toml():
    presets = sorted(CONFIG_DIR.glob("*.toml"))
    assert {"dcgan64", "federated-dcgan64", "demo"} <= {p.stem for p in presets}
    for preset in presets:
        cfg = load_config(preset.stem)
        assert config_from_toml_text(cfg.to_toml(), "round trip") == cfg


def test_overrides_parse_toml_values_and_nested_keys():
    cfg = load_config("dcgan64", ["train.steps=7", "privacy.dp=true", "run.name=abc", "data.augment.hflip_p=0.5",
                                  "train.lr_g=1e-3"])
    assert (cfg.train.steps, cfg.privacy.dp, cfg.run.name, cfg.data.augment.hflip_p, cfg.train.lr_g) == (
        7, True, "abc", 0.5, 1e-3)


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown key 'train.stepz'"),
    ("train.steps=-1", "bad value for 'train.steps'"),
    ("model.arch=vae", "bad value for 'model.arch'"),
    ("steps=3", "must name a section"),
    ("train.steps", "not of the form"),
    ("model.resolution=128", "data.size (64) differs from model.resolution (128)"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(UserError) as err:
        load_config("dcgan64", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(UserError, match="dcgan64"):
        load_config("no-such-preset")


def test_cli_prints_one_line_and_exits_2_on_bad_input():
    proc = subprocess.run([sys.executable, "-m", "medsyngan.cli", "config", "show", "--set", "train.stepz=1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown key 'train.stepz'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_directory_layout_resume_guard_and_metrics(tmp_path):
    cfg = load_config("dcgan64", ["train.steps=3"])
    run = RunDir(tmp_path / "run").create(cfg)
    assert run.config_path.is_file() and run.checkpoints.is_dir() and run.samples.is_dir()
    assert run.load_config() == cfg
    run.append_metrics({"step": 1, "d_loss": 0.5})
    run.append_metrics({"step": 2, "d_loss": 0.4})
    with open(run.metrics_path, "a") as fh:
        fh.write('{"step": 3, "d_lo')  # a run killed mid-write
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
    run.truncate_metrics_after("step", 1)
    assert [r["step"] for r in run.read_metrics()] == [1]
    (run.checkpoints / "step-000001").mkdir()
    with pytest.raises(UserError, match="--resume"):
        RunDir(tmp_path / "run").create(cfg)
    assert json.loads(run.metrics_path.read_text().splitlines()[0])["step"] == 1
