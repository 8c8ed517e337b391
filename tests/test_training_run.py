"""Runs, checkpoints and generation: round trip, exact resume, stop on signal, learning on phantoms, DICOM marking,
and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from medsyngan.config import load_config
from medsyngan.errors import UserError
from medsyngan.rundir import RunDir
from medsyngan.training.checkpoint import load_checkpoint, restore_trainer, save_trainer_checkpoint
from medsyngan.training.generate import SYNTHETIC_MARKER, generate_images, load_generator, write_dicom
from medsyngan.training.step import GANTrainer

RUN = ["run.device=cpu", "model.ngf=8", "model.ndf=8", "model.z_dim=16", "model.resolution=32", "data.size=32",
       "data.phantom_patients=16", "data.phantom_images_per_patient=2", "train.batch_size=8", "train.log_every=2",
       "train.sample_every=4", "train.checkpoint_every=3"]


@pytest.fixture
def cfg(medsyngan_cache):
    return load_config("dcgan64", RUN + ["train.steps=6", "train.ema_kimg=0.05"])


def _weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).tensors


# --- checkpoints ------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path, cfg):
    trainer = GANTrainer(cfg)
    gen = torch.Generator().manual_seed(0)
    trainer.train_step(lambda: torch.rand(8, 1, 32, 32, generator=gen) * 2 - 1)
    path = save_trainer_checkpoint(tmp_path, trainer, cfg, loader_state={"epoch": 3, "rng": torch.arange(4)})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.path == path and (tmp_path / "latest").read_text().strip() == path.name
    assert (ckpt.meta["arch"], ckpt.meta["resolution"], ckpt.meta["step"]) == ("dcgan", 32, 1)
    assert ckpt.config() == cfg and set(ckpt.meta["rng"]) >= {"torch", "numpy", "python"}
    for key, value in trainer.model_state(("G", "D", "G_ema")).items():
        assert torch.equal(ckpt.tensors[key], value), key
    other = GANTrainer(load_config("dcgan64", RUN + ["run.seed=5", "train.ema_kimg=0.05"]))
    loader_state = restore_trainer(other, ckpt)
    assert loader_state["epoch"] == 3 and torch.equal(loader_state["rng"], torch.arange(4))
    assert other.step == 1 and other.images_seen == 8
    assert torch.equal(other.rng.get_state(), trainer.rng.get_state())


def test_only_the_last_checkpoints_are_kept(tmp_path, cfg):
    trainer = GANTrainer(cfg)
    for step in range(1, 6):
        trainer.step = step
        save_trainer_checkpoint(tmp_path, trainer, cfg, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000004", "step-000005"]


def test_corrupt_missing_and_mismatched_checkpoints_are_one_line_errors(tmp_path, cfg):
    trainer = GANTrainer(cfg)
    path = save_trainer_checkpoint(tmp_path, trainer, cfg)
    with pytest.raises(UserError, match="dcgan model at 32 px but the configuration asks for progan at 64 px"):
        load_checkpoint(path).check_matches(load_config("progan64"))
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(UserError, match="corrupt or incomplete.*SHA-256"):
        load_checkpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint found"):
        load_checkpoint(tmp_path / "empty")
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        load_generator(junk)


# --- centralized runs ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, cfg):
    from medsyngan.workflows.centralized import train_centralized

    full = RunDir(tmp_path / "full").create(cfg)
    train_centralized(cfg, full)
    half_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 3})})
    split = RunDir(tmp_path / "split").create(half_cfg)
    train_centralized(half_cfg, split)
    summary = train_centralized(cfg, split, resume=True)
    assert summary["step"] == 6 and not summary["interrupted"]
    a, b = _weights(full.root), _weights(split.root)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = split.read_metrics()
    # Every log_every steps and at the end of each invocation; no step twice.
    assert [r["step"] for r in rows] == [2, 3, 4, 6] and all(r["img_per_s"] > 0 for r in rows)
    assert {"d_loss", "g_loss", "kimg"} <= set(rows[0])
    assert sorted(p.name for p in full.samples.iterdir()) == ["step-000004.png", "step-000006.png"]


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint_that_resumes(tmp_path, medsyngan_cache):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "medsyngan.cli", "train", "--config", "dcgan64", "--out", str(out)]
    for item in RUN + ["train.checkpoint_every=1000", "train.sample_every=1000"]:
        args += ["--set", item]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    try:
        log = out / "metrics.jsonl"
        deadline = 120
        import time

        start = time.time()
        while not (log.is_file() and log.read_text().strip()) and time.time() - start < deadline:
            time.sleep(0.2)
        proc.terminate()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    meta = json.loads((load_checkpoint(out).path / "meta.json").read_text())
    assert 2 <= meta["step"] < 2000
    resumed = subprocess.run([sys.executable, "-m", "medsyngan.cli", "train", "--resume", "--out", str(out),
                              "--steps", str(meta["step"] + 1)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(out).meta["step"] == meta["step"] + 1


def _stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = images.astype(np.float64) / 255
    return x.mean(0), np.histogram(x, bins=16, range=(0, 1))[0] / x.size


@pytest.mark.slow
def test_short_run_moves_samples_towards_the_data(tmp_path, medsyngan_cache):
    """After a short run, the samples' mean image and intensity histogram are closer to the phantoms' than at init."""
    from medsyngan.data.api import load_training_data
    from medsyngan.workflows.centralized import train_centralized

    cfg = load_config("dcgan64", RUN + ["train.steps=100", "train.checkpoint_every=100", "train.sample_every=100",
                                        "train.log_every=100", "train.lr_g=1e-3", "train.lr_d=1e-3"])
    data = np.asarray(load_training_data(cfg).images)
    mean_real, hist_real = _stats(data)
    before_mean, before_hist = _stats(generate_images(GANTrainer(cfg).G.eval(), 64, seed=1))
    train_centralized(cfg, RunDir(tmp_path).create(cfg))
    G, _ = load_generator(tmp_path)
    after_mean, after_hist = _stats(generate_images(G, 64, seed=1))

    def dist(a, b):
        return float(np.abs(a - b).mean())

    # Measured: about 0.55x for both after 100 steps (seeded, so the margin is the same on every run).
    assert dist(after_mean, mean_real) < 0.75 * dist(before_mean, mean_real)
    assert dist(after_hist, hist_real) < 0.75 * dist(before_hist, hist_real)


# --- generation and DICOM --------------------------------------------------------------------------------------


def test_generation_is_seeded_and_batch_size_invariant(tmp_path, cfg):
    G = GANTrainer(cfg).G
    a = generate_images(G, 5, seed=3, batch_size=2)
    b = generate_images(G, 5, seed=3, batch_size=64)
    assert a.shape == (5, 32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, generate_images(G, 5, seed=4))
    with pytest.raises(UserError, match="StyleGAN2"):
        generate_images(G, 2, seed=0, truncation_psi=0.7)


def test_dicom_files_are_marked_synthetic(tmp_path):
    import pydicom

    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32), dtype=np.uint8)
    paths = write_dicom(images, tmp_path, {"arch": "dcgan", "resolution": 32, "step": 7})
    a, b = (pydicom.dcmread(p) for p in paths)
    for ds, img in ((a, images[0]), (b, images[1])):
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.ImageComments == SYNTHETIC_MARKER and "SYNTHETIC" in ds.SeriesDescription
        assert ds.ConversionType == "SYN" and ds.BurnedInAnnotation == "NO"
        assert str(ds.PatientName) == "SYNTHETIC^MEDSYNGAN" and ds.PatientID == "SYNTHETIC"
        assert "PatientBirthDate" not in ds and "PatientSex" not in ds and "InstitutionName" not in ds
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 8
        assert np.array_equal(ds.pixel_array, img)
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.StudyInstanceUID == b.StudyInstanceUID
    again = pydicom.dcmread(write_dicom(images[:1], tmp_path / "again")[0])
    assert again.StudyInstanceUID != a.StudyInstanceUID  # fresh UIDs on every export


# --- the command line ---------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medsyngan.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "model.arch=biggan"], "model.arch"),
        (["--set", "model.resolution=48", "--set", "data.size=48"], "use one of: 32, 64, 128, 256"),
        (["--set", "data.size=32"], "data.size (32) differs from model.resolution (64)"),
    ],
)
def test_train_bad_input_is_one_line(tmp_path, medsyngan_cache, args, message):
    result = _cli("train", "--config", "dcgan64", "--out", str(tmp_path / "r"), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_generate_bad_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 64)
    result = _cli("generate", "--checkpoint", str(bad), "--count", "1", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "corrupt" in result.stderr


@pytest.mark.slow
def test_cli_train_then_generate_dicom(tmp_path, medsyngan_cache):
    out = tmp_path / "run"
    sets = [x for item in RUN for x in ("--set", item)]
    assert _cli("train", "--config", "dcgan64", *sets, "--steps", "2", "--out", str(out)).returncode == 0
    result = _cli("generate", "--run", str(out), "--count", "3", "--format", "dicom", "--out", str(tmp_path / "g"))
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "g").glob("*.dcm"))) == 3
    wrong = _cli("train", "--config", "progan64", "--resume", "--out", str(out))
    assert wrong.returncode == 2 and "dcgan model at 32 px" in wrong.stderr


# --- warm start ---------------------------------------------------------------------------------------------------


def test_init_from_starts_centralized_and_federated_runs_from_the_checkpoint_weights(tmp_path, cfg):
    from medsyngan.federated.server_state import ServerState
    from medsyngan.workflows.centralized import train_centralized

    source = RunDir(tmp_path / "public").create(cfg)
    train_centralized(cfg, source)
    pretrained = _weights(source.root)
    # A learning rate of 1e-12 leaves the weights where the first step found them (to ~1e-12), so they show where
    # the run started; BatchNorm running statistics do move and are left out.
    warm_cfg = load_config("dcgan64", RUN + ["train.steps=1", "train.ema_kimg=0.05", "train.lr_g=1e-12", "train.lr_d=1e-12",
                                             f"train.init_from={json.dumps(str(source.root))}"])
    warm = RunDir(tmp_path / "warm").create(warm_cfg)
    train_centralized(warm_cfg, warm)
    started = _weights(warm.root)
    params = [k for k in pretrained if k.startswith(("G.", "D.")) and "running_" not in k and "num_batches" not in k]
    assert params and all(torch.allclose(started[k], pretrained[k], atol=1e-8) for k in params)
    state = ServerState.initial(warm_cfg)
    assert all(torch.equal(state.global_state[k], pretrained[k]) for k in pretrained if k.startswith(("G.", "D.")))
    assert all(torch.equal(v, pretrained[k.replace("G_ema.", "G.", 1)]) for k, v in state.ema_state.items())


def test_init_from_another_model_is_one_line(tmp_path, cfg):
    from medsyngan.workflows.centralized import train_centralized
    from medsyngan.training.pretrained import pretrained_state

    source = RunDir(tmp_path / "public").create(cfg)
    train_centralized(cfg, source)
    other = load_config("dcgan64", RUN + ["model.ngf=16", f"train.init_from={json.dumps(str(source.root))}"])
    with pytest.raises(UserError, match=r"model\.ngf \(8 there, 16 here\)"):
        pretrained_state(other)
    missing = load_config("dcgan64", RUN + [f"train.init_from={json.dumps(str(tmp_path / 'nowhere'))}"])
    with pytest.raises(UserError, match="does not exist"):
        pretrained_state(missing)
