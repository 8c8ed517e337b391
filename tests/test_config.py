"""The one configuration: presets, --set overrides, one-line errors naming the key, versions and their migration,
and the run directory."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest
import tomli_w

from medsyngan import config_versions
from medsyngan.config import PRESETS, config_from_toml_text, load_config, preset_names
from medsyngan.config_versions import CONFIG_VERSION, MIGRATIONS, Migration
from medsyngan.errors import UserError
from medsyngan.rundir import RunDir


def test_every_preset_loads_and_round_trips_through_toml():
    presets = preset_names()
    assert {"dcgan64", "federated-dcgan64", "demo"} <= set(presets)
    for name in presets:
        cfg = load_config(name)
        assert config_from_toml_text(cfg.to_toml(), "round trip") == cfg
        assert load_config(f"{name}.toml") == cfg


def test_shipped_presets_are_written_in_the_current_version():
    for name in preset_names():
        text = (PRESETS / f"{name}.toml").read_text()
        assert tomllib.loads(text)["version"] == CONFIG_VERSION, name


def test_a_preset_given_as_a_path_is_read_from_that_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(f'version = {CONFIG_VERSION}\n[run]\nname = "mine"\n[train]\nsteps = 9\n')
    cfg = load_config(path)
    assert (cfg.run.name, cfg.train.steps) == ("mine", 9)


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


# --------------------------------------------------------------------------------------- versions and migration

def _saved_tree(cfg) -> dict:
    return tomllib.loads(cfg.to_toml())


def test_the_saved_configuration_carries_its_version(tmp_path):
    run = RunDir(tmp_path / "run").create(load_config("dcgan64"))
    assert tomllib.loads(run.config_path.read_text())["version"] == CONFIG_VERSION
    assert CONFIG_VERSION == max(MIGRATIONS) + 1 and set(MIGRATIONS) == set(range(1, CONFIG_VERSION))


def test_a_file_without_version_is_version_1_whose_run_seed_also_drew_the_data(tmp_path):
    tree = _saved_tree(load_config("dcgan64", ["run.seed=3"]))
    del tree["version"], tree["data"]["seed"]
    run = RunDir(tmp_path / "old")
    run.root.mkdir()
    run.config_path.write_text(tomli_w.dumps(tree))
    cfg = run.load_config()
    assert (cfg.run.seed, cfg.data.seed) == (3, 3)
    # Read by path (train --resume and evaluate --run read it so), with an override on top.
    again = load_config(run.config_path, ["train.steps=5"])
    assert (again.data.seed, again.train.steps) == (3, 5)
    # A file of the current version keeps its own data seed.
    assert config_from_toml_text(load_config("dcgan64", ["run.seed=3"]).to_toml(), "new").data.seed == 0


def test_migration_renames_and_removes_keys_step_by_step(monkeypatch):
    """A synthetic version 3 that renamed train.lr_gen to train.lr_g and dropped train.old_knob."""
    table = {**MIGRATIONS, CONFIG_VERSION: Migration("lr_gen is lr_g; old_knob is gone",
                                                     renamed={"train.lr_gen": "train.lr_g"},
                                                     removed=("train.old_knob",))}
    monkeypatch.setattr(config_versions, "MIGRATIONS", table)
    monkeypatch.setattr(config_versions, "CONFIG_VERSION", CONFIG_VERSION + 1)
    old = f"version = {CONFIG_VERSION}\n[run]\nseed = 4\n[train]\nlr_gen = 0.003\nold_knob = 2\nsteps = 7\n"
    cfg = config_from_toml_text(old, "synthetic")
    assert (cfg.train.lr_g, cfg.train.steps, cfg.data.seed) == (0.003, 7, 0)
    # From version 1, both steps apply in order.
    cfg = config_from_toml_text("[run]\nseed = 4\n[train]\nlr_gen = 0.003\nold_knob = 2\n", "synthetic v1")
    assert (cfg.train.lr_g, cfg.data.seed) == (0.003, 4)
    # The current version reads the new name only.
    with pytest.raises(UserError, match="unknown key 'train.lr_gen'"):
        config_from_toml_text(f"version = {CONFIG_VERSION + 1}\n[train]\nlr_gen = 0.003\n", "current")


@pytest.mark.parametrize("version, message", [
    (CONFIG_VERSION + 1, f"configuration version {CONFIG_VERSION + 1} is newer than this MedSynGAN reads "
                         f"(version {CONFIG_VERSION})"),
    (0, "is not a configuration version"),
    ('"2"', "is not a configuration version"),
])
def test_a_newer_or_malformed_version_is_a_one_line_error(tmp_path, version, message):
    path = tmp_path / "config.toml"
    path.write_text(f"version = {version}\n[run]\nseed = 1\n")
    for read in (lambda: load_config(path), lambda: RunDir(tmp_path).load_config()):
        with pytest.raises(UserError) as err:
            read()
        assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medsyngan.cli", *args], capture_output=True, text=True)


def _make_version_1(toml_text: str) -> str:
    tree = tomllib.loads(toml_text)
    del tree["version"], tree["data"]["seed"]
    return tomli_w.dumps(tree)


@pytest.mark.slow
def test_train_resume_generate_and_evaluate_read_a_version_1_run_folder(tmp_path, medsyngan_cache):
    run = RunDir(tmp_path / "run")
    tiny = ["run.device=cpu", "run.threads=1", "run.seed=3", "data.seed=3", "model.ngf=8", "model.ndf=8",
            "model.z_dim=16", "model.resolution=32", "data.size=32", "data.phantom_patients=12",
            "data.phantom_images_per_patient=2", "train.batch_size=8", "train.checkpoint_every=1",
            "train.sample_every=2"]
    first = _cli("train", "--config", "dcgan64", "--out", str(run.root), "--steps", "2",
                 *[a for item in tiny for a in ("--set", item)])
    assert first.returncode == 0, first.stderr
    # What a run folder written before configuration versions looks like: no version, and no data.seed because
    # run.seed drew the data; its checkpoints embed the same configuration.
    run.config_path.write_text(_make_version_1(run.config_path.read_text()))
    latest = run.checkpoints / (run.checkpoints / "latest").read_text().strip()
    meta = json.loads((latest / "meta.json").read_text())
    meta["config_toml"] = _make_version_1(meta["config_toml"])
    (latest / "meta.json").write_text(json.dumps(meta))

    resumed = _cli("train", "--out", str(run.root), "--resume", "--steps", "3")
    assert resumed.returncode == 0, resumed.stderr
    from medsyngan.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run.root)
    assert ckpt.meta["step"] == 3 and ckpt.config().data.seed == 3  # the data the run trained on from its start
    generated = _cli("generate", "--checkpoint", str(latest), "--count", "4", "--out", str(tmp_path / "gen"))
    assert generated.returncode == 0, generated.stderr
    assert len(list((tmp_path / "gen").glob("*.png"))) == 4
    evaluated = _cli("evaluate", "--run", str(run.root), "--real", str(tmp_path / "gen"), "--metrics", "fd",
                     "--count", "4", "--snapshot-count", "0", "--out", str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert (tmp_path / "eval" / "metrics.json").is_file()

    run.config_path.write_text(f"version = {CONFIG_VERSION + 1}\n" + run.config_path.read_text())
    refused = _cli("train", "--out", str(run.root), "--resume", "--steps", "4")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"configuration version {CONFIG_VERSION + 1} is newer" in refused.stderr
