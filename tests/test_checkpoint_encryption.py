"""Checkpoints encrypted at rest (privacy.checkpoint_key): nothing readable on disk, exact round trip and resume,
one-line errors for a missing, wrong or absent key, for altered files and for files of another run, step or
hospital, and the CLI end to end."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from medsyngan.cli import app
from medsyngan.config import load_config
from medsyngan.errors import UserError
from medsyngan.rundir import RunDir
from medsyngan.sealed import MAGIC, generate_key_file, load_key_file
from medsyngan.training.checkpoint import (
    META_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
    restore_trainer,
    save_trainer_checkpoint,
)
from medsyngan.training.step import GANTrainer

RUN = ["run.device=cpu", "model.ngf=8", "model.ndf=8", "model.z_dim=16", "model.resolution=32", "data.size=32",
       "data.phantom_patients=16", "data.phantom_images_per_patient=2", "train.batch_size=8", "train.log_every=2",
       "train.sample_every=100", "train.checkpoint_every=3", "train.steps=6", "train.ema_kimg=0.05"]
FILES = (WEIGHTS_FILE, STATE_FILE, META_FILE)


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "keys" / "hospital.key"
    path.parent.mkdir()
    generate_key_file(path)
    return path


@pytest.fixture
def cfg(medsyngan_cache, key_file):
    return load_config("dcgan64", RUN + [f"privacy.checkpoint_key={key_file}"])


def _trained(cfg) -> GANTrainer:
    trainer = GANTrainer(cfg)
    gen = torch.Generator().manual_seed(0)
    trainer.train_step(lambda: torch.rand(8, 1, 32, 32, generator=gen) * 2 - 1)
    return trainer


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _secrets(trainer: GANTrainer) -> dict[str, list[bytes]]:
    """Byte strings that a plaintext checkpoint holds in each file (checked against one below, so the test can fail)."""
    weight = max(trainer.model_state(("G",)).values(), key=torch.Tensor.numel)
    moment = max((v for st in trainer.opt_g.state_dict()["state"].values() for v in st.values() if v.numel() > 1),
                 key=torch.Tensor.numel)
    return {
        WEIGHTS_FILE: [b"__metadata__", b"config_toml", _raw(weight)[:256]],
        STATE_FILE: [b"data.pkl", _raw(moment)[:256]],
        META_FILE: [b'"config_toml"', b'"rng"', b'"arch": "dcgan"'],
    }


def test_sealed_checkpoint_files_hold_no_plaintext_and_round_trip(tmp_path, cfg, key_file):
    trainer = _trained(cfg)
    plain = save_trainer_checkpoint(tmp_path / "plain", trainer, cfg, loader_state={"epoch": 3})
    sealed = save_trainer_checkpoint(tmp_path / "sealed", trainer, cfg, loader_state={"epoch": 3},
                                     key=load_key_file(key_file))
    for name, needles in _secrets(trainer).items():
        plain_bytes, sealed_bytes = (plain / name).read_bytes(), (sealed / name).read_bytes()
        assert sealed_bytes.startswith(MAGIC), name
        for needle in needles:
            assert needle in plain_bytes, (name, needle[:20])  # the needles are real plaintext ...
            assert needle not in sealed_bytes, (name, needle[:20])  # ... and none of it is on disk when sealed

    ckpt = load_checkpoint(tmp_path / "sealed", load_key_file(key_file))
    assert ckpt.path == sealed and ckpt.meta["step"] == 1 and ckpt.config() == cfg
    reference = load_checkpoint(tmp_path / "plain")
    for k, v in trainer.model_state(("G", "D", "G_ema")).items():
        assert torch.equal(ckpt.tensors[k], v), k
    buf_a, buf_b = io.BytesIO(), io.BytesIO()
    torch.save(ckpt.training_state(), buf_a)
    torch.save(reference.training_state(), buf_b)
    assert buf_a.getvalue() == buf_b.getvalue()
    other = GANTrainer(load_config("dcgan64", RUN + ["run.seed=5"]))
    assert restore_trainer(other, ckpt) == {"epoch": 3}
    assert other.step == 1 and torch.equal(other.rng.get_state(), trainer.rng.get_state())


def test_missing_wrong_key_and_altered_files_are_one_line_errors(tmp_path, cfg, key_file):
    key = load_key_file(key_file)
    folder = save_trainer_checkpoint(tmp_path / "ckpt", _trained(cfg), cfg, key=key)

    def error(path, key=None) -> str:
        with pytest.raises(UserError) as info:
            load_checkpoint(path, key)
        assert "\n" not in str(info.value)
        return str(info.value)

    # Outside a run directory nothing names the key.
    assert "is encrypted; pass --key FILE" in error(folder)
    assert "does not decrypt with the key given: wrong key file" in error(folder, os.urandom(32))
    # A lone weights file renamed still opens (the role is bound, not the name) ...
    lone = tmp_path / "best.safetensors"
    shutil.copy(folder / WEIGHTS_FILE, lone)
    assert load_checkpoint(lone, key).meta["step"] == 1
    # ... but a sealed file of another role does not pass for weights.
    shutil.copy(folder / META_FILE, lone)
    assert "is refused: encrypted file is the checkpoint/meta.json" in error(lone, key)

    for name, expected in ((WEIGHTS_FILE, "corrupt or incomplete"), (STATE_FILE, "corrupt or incomplete"),
                           (META_FILE, "wrong key file, or the file was altered")):
        copy = tmp_path / f"altered-{name}"
        shutil.copytree(folder, copy)
        _flip(copy / name, len((copy / name).read_bytes()) // 2)
        assert expected in error(copy, key), name


def test_missing_key_file_stops_training_before_it_starts(tmp_path, medsyngan_cache):
    from medsyngan.workflows.centralized import train_centralized

    cfg = load_config("dcgan64", RUN + [f"privacy.checkpoint_key={tmp_path / 'absent.key'}"])
    run = RunDir(tmp_path / "run").create(cfg)
    with pytest.raises(UserError, match="absent.key not found"):
        train_centralized(cfg, run)
    assert not run.metrics_path.exists() and not any(run.checkpoints.iterdir())


def test_encrypted_resume_reproduces_the_uninterrupted_plaintext_run(tmp_path, cfg):
    from medsyngan.workflows.centralized import train_centralized

    plain_cfg = load_config("dcgan64", RUN)
    full = RunDir(tmp_path / "full").create(plain_cfg)
    train_centralized(plain_cfg, full)
    half_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 3})})
    split = RunDir(tmp_path / "split").create(half_cfg)
    train_centralized(half_cfg, split)
    assert all((split.checkpoints / "step-000003" / f).read_bytes().startswith(MAGIC) for f in FILES)
    assert train_centralized(cfg, split, resume=True)["step"] == 6
    # Loaded from the run directory with no key given: its config.toml names the key file.
    a, b = load_checkpoint(full.root), load_checkpoint(split.root)
    assert all((b.path / f).read_bytes().startswith(MAGIC) for f in FILES)
    assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert a.meta["rng"] == b.meta["rng"] and a.meta["loader"] == b.meta["loader"]


def test_cli_trains_encrypted_and_generates_from_the_run(tmp_path, medsyngan_cache, monkeypatch):
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["privacy", "keygen", "hospital.key"]).exit_code == 0
    args = ["train", "--config", "dcgan64", "--out", "run", "--steps", "2", "--set", "privacy.checkpoint_key=hospital.key"]
    for item in RUN:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    ckpt = RunDir(tmp_path / "run").checkpoints / "step-000002"
    assert all((ckpt / f).read_bytes().startswith(MAGIC) for f in FILES)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the run's config.toml holds the key file's absolute path
    result = runner.invoke(app, ["generate", "--run", str(tmp_path / "run"), "--out", "png", "-n", "3"])
    assert result.exit_code == 0, result.output
    assert len(list((elsewhere / "png").glob("*.png"))) == 3
    lone = elsewhere / "model.safetensors"
    shutil.copy(ckpt / WEIGHTS_FILE, lone)
    result = runner.invoke(app, ["generate", "--checkpoint", str(lone), "--key", str(tmp_path / "hospital.key"),
                                 "--out", "png-key", "-n", "2"])
    assert result.exit_code == 0, result.output

    # Through the real entry point: one red line and exit status 2, no traceback.
    proc = subprocess.run([sys.executable, "-m", "medsyngan.cli", "generate", "--checkpoint", str(lone),
                           "--out", "nokey"], capture_output=True, text=True, timeout=120, cwd=elsewhere)
    assert proc.returncode == 2
    assert "is encrypted; pass --key FILE" in proc.stderr and "Traceback" not in proc.stderr


def test_federated_server_checkpoints_are_sealed_and_resume(tmp_path, cfg, key_file):
    from medsyngan.federated.server_state import ServerState, load_server_state, save_server_state

    key = load_key_file(key_file)
    run = RunDir(tmp_path / "fed").create(cfg)
    state = ServerState.initial(cfg)
    state.round, state.images_seen, state.last_round = 1, 64, {0: 1, 1: 1}
    state.optimizer_state = {"momentum": torch.randn(300)}
    folder = save_server_state(run, state, cfg, key)
    assert folder.name == "round-00001" and all((folder / f).read_bytes().startswith(MAGIC) for f in FILES)
    assert _raw(state.optimizer_state["momentum"])[:256] not in (folder / STATE_FILE).read_bytes()
    back = load_server_state(run, key)
    assert (back.round, back.images_seen, back.last_round) == (1, 64, {0: 1, 1: 1})
    assert torch.equal(back.optimizer_state["momentum"], state.optimizer_state["momentum"])
    assert all(torch.equal(back.global_state[k], v) for k, v in state.global_state.items())
    # A wrong key given falls back to the key file the run's config.toml names; without that file it fails clearly.
    assert load_server_state(run, os.urandom(32)).round == 1
    key_file.unlink()
    with pytest.raises(UserError, match=r"does not decrypt with the key given: .*its run names key file .*hospital.key .* not found here"):
        load_server_state(run, os.urandom(32))
    with pytest.raises(UserError, match="is encrypted; pass --key FILE"):
        load_server_state(run)


def _sealed_run(tmp_path, name, cfg) -> RunDir:
    from medsyngan.workflows.centralized import train_centralized

    run = RunDir(tmp_path / name).create(cfg)
    train_centralized(cfg, run)
    return run


def test_a_checkpoint_folder_from_another_run_under_the_same_key_is_refused(tmp_path, cfg):
    """Attack: a sealed checkpoint folder of another run (same key file) put in place of this run's."""
    mine, theirs = _sealed_run(tmp_path, "mine", cfg), _sealed_run(tmp_path, "theirs", cfg)
    target = mine.checkpoints / "step-000006"
    shutil.rmtree(target)
    shutil.copytree(theirs.checkpoints / "step-000006", target)
    with pytest.raises(UserError) as info:
        load_checkpoint(mine.root)
    message = str(info.value)
    assert "\n" not in message and "is refused" in message
    assert f"run {theirs.run_id()}" in message and f"run {mine.run_id()}" in message


def test_a_checkpoint_folder_of_another_step_is_refused(tmp_path, cfg):
    """Attack: an older step's sealed folder renamed to the newest step (a rollback of optimizer and DP state)."""
    run = _sealed_run(tmp_path, "run", cfg)
    newest = run.checkpoints / "step-000006"
    shutil.rmtree(newest)
    shutil.copytree(run.checkpoints / "step-000003", newest)
    with pytest.raises(UserError, match=r"is refused: encrypted file is the checkpoint/meta\.json of run \w+, "
                                        r"step 3, not the checkpoint/meta\.json of run \w+, step 6"):
        load_checkpoint(run.root)
    assert load_checkpoint(run.checkpoints / "step-000003").meta["step"] == 3  # in its own place it still opens


class _State:
    """What persist/restore need of a hospital: its state as a dict, and a configuration without DP (so that
    restore asks for no privacy ledger)."""

    def __init__(self, value: int):
        self.state = {"value": torch.full((64,), float(value))}
        self.cfg = SimpleNamespace(privacy=SimpleNamespace(dp=False))

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


@pytest.mark.parametrize("swap", ["another round", "another run", "another hospital"])
def test_sealed_hospital_state_of_another_round_run_or_hospital_is_refused(tmp_path, key_file, swap):
    """Attack: a hospital's sealed round state replaced by its state of another round, of another run, or by
    another hospital's state (all under the same simulation key)."""
    from medsyngan.federated.client import node_identity, persist, restore, state_file
    from medsyngan.federated.protocol import Job

    def identity(run_id: str, hospital: int):
        node = {"hospital-id": hospital, "data-path": "unused", "state-dir": str(tmp_path / run_id),
                "state-key": str(key_file), "aggregator-public": "unused"}
        return node_identity(node, Job(config="", run_id=run_id))

    mine = identity("run-a", 0)
    for round_ in (1, 2):
        persist(_State(round_), mine, round_)
    back = _State(0)
    restore(back, mine, 2, None)
    assert torch.equal(back.state["value"], torch.full((64,), 2.0))

    source = {"another round": (mine, 1), "another run": (identity("run-b", 0), 2),
              "another hospital": (identity("run-a", 1), 2)}[swap]
    persist(_State(9), *source)
    shutil.copy(state_file(*source), state_file(mine, 2))
    with pytest.raises(UserError) as info:
        restore(_State(0), mine, 2, None)
    assert "\n" not in str(info.value) and "hospital-0/state of run run-a, step 2" in str(info.value)
