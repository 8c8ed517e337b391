"""Conditional generation end to end: a conditional run records its label frequencies, `medsyngan generate` makes
the labels asked for (one-line errors for unknown labels and for an unconditional model), DICOM files carry the
requested labels as synthetic conditioning, and a conditional model trained on a toy problem draws what each label
shows, as a classifier trained on the real toy films tells."""

from __future__ import annotations

import csv
import sys

import numpy as np
import pytest
import torch
from cli_run import run_cli

from medsyngan.cli import main
from medsyngan.data.labels import JointLabels, LabelLayout
from medsyngan.data.loader import BatchLoader
from medsyngan.errors import UserError
from medsyngan.metrics.auroc import auroc, balanced_accuracy
from medsyngan.metrics.classifier import ClassifierSettings, predict, train_classifier
from medsyngan.training.checkpoint import load_checkpoint
from medsyngan.training.generate import SYNTHETIC_MARKER, generate_images, load_generator
from medsyngan.training.step import GANTrainer

RUN = ["run.device=cpu", "run.threads=1", "model.ngf=8", "model.ndf=8", "model.z_dim=16", "model.resolution=32",
       "data.size=32", "data.phantom_patients=16", "data.phantom_images_per_patient=2", "train.batch_size=8",
       "train.steps=2", "train.checkpoint_every=2", "train.sample_every=2", "train.log_every=1"]
CONDITION = "model.condition=['findings', 'view', 'sex', 'age']"


def _train(monkeypatch, capsys, out, *extra: str) -> None:
    sets = [item for s in RUN + list(extra) for item in ("--set", s)]
    code, _, err = run_cli(monkeypatch, capsys, "train", "--config", "dcgan64", "--out", str(out), *sets)
    assert code == 0, err


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory, medsyngan_cache):
    out = tmp_path_factory.mktemp("conditional") / "run"
    mp = pytest.MonkeyPatch()
    try:
        sets = [item for s in RUN + [CONDITION] for item in ("--set", s)]
        mp.setattr(sys, "argv", ["medsyngan", "train", "--config", "dcgan64", "--out", str(out), *sets])
        main()
    finally:
        mp.undo()
    return out


def test_a_conditional_run_records_the_label_frequencies_it_drew_from(conditional_run):
    ckpt = load_checkpoint(conditional_run)
    assert ckpt.meta["labels"]["kind"] == "joint" and ckpt.meta["labels"]["groups"] == ["findings", "view", "sex",
                                                                                       "age"]
    G, _ = load_generator(conditional_run)
    assert G.c_dim == 22 and isinstance(G.label_distribution, JointLabels)
    alone, _ = load_generator(ckpt.path / "model.safetensors")  # the weights file alone carries them too
    assert np.array_equal(alone.label_distribution.rows, G.label_distribution.rows)
    # Without labels a conditional generator draws them from those frequencies, reproducibly.
    assert np.array_equal(generate_images(G, 4, seed=1), generate_images(G, 4, seed=1))
    one = LabelLayout.of(["findings", "view", "sex", "age"]).encode(["Effusion"], "AP", "F", 45)
    assert generate_images(G, 3, seed=1, labels=torch.from_numpy(one)).shape == (3, 32, 32)


def test_generate_writes_dicom_files_that_carry_the_requested_labels(conditional_run, tmp_path, monkeypatch, capsys):
    import pydicom

    code, out, err = run_cli(monkeypatch, capsys, "generate", "--run", str(conditional_run), "--out", str(tmp_path),
                          "--count", "3", "--format", "dicom", "--label", "Effusion", "--view", "AP", "--sex", "F",
                          "--age", "40-59")
    assert code == 0, err
    assert "for Effusion, AP, F, 40-59" in " ".join(err.split())
    files = sorted(tmp_path.glob("*.dcm"))
    assert len(files) == 3
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.ViewPosition == "AP" and ds.PatientSex == "F"
        assert ds.ImageComments.startswith(SYNTHETIC_MARKER) and "findings Effusion" in ds.ImageComments
        assert ds.PatientComments.startswith("SYNTHETIC - requested conditioning, not a patient's")
        assert "age band 40-59" in ds.PatientComments and "PatientAge" not in ds and "PatientBirthDate" not in ds
        assert ds.PatientID == "SYNTHETIC" and ds.ConversionType == "SYN"


def test_generate_draws_the_labels_not_asked_for_and_lists_them(conditional_run, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--run", str(conditional_run), "--out", str(tmp_path),
                        "--count", "6", "--view", "PA")
    assert code == 0, err
    assert "6 png images (32 px) for PA to" in " ".join(err.split())
    with open(tmp_path / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["image"] for r in rows] == [f"synthetic-{i:06d}.png" for i in range(6)]
    assert {r["view"] for r in rows} == {"PA"} and all(r["sex"] in ("F", "M") for r in rows)


def test_an_exported_conditional_model_keeps_its_label_frequencies(conditional_run, tmp_path):
    from medsyngan.workflows.export import export_model

    export_model(conditional_run, tmp_path / "model")
    G, _ = load_generator(tmp_path / "model")
    trained, _ = load_generator(conditional_run)
    assert np.array_equal(G.label_distribution.rows, trained.label_distribution.rows)
    assert np.array_equal(generate_images(G, 3, seed=2), generate_images(trained, 3, seed=2))


def test_a_model_without_recorded_frequencies_needs_every_label_given(conditional_run):
    from medsyngan.training.generate import request_labels

    G, _ = load_generator(conditional_run)
    G.label_distribution = None  # as a federation whose hospitals drew labels from their own data leaves it
    layout = LabelLayout.of(["findings", "view", "sex", "age"])
    with pytest.raises(UserError, match=r"records no label frequencies .* every label given \(--label, --sex, --age\)"):
        request_labels(G, 2, 0, layout.request(view="AP"))
    full = request_labels(G, 2, 0, layout.request(["Mass"], "AP", "M", "60+"))
    assert [layout.describe(c) for c in full] == ["Mass, AP, M, 60+"] * 2


@pytest.mark.parametrize("args, message", [
    (["--label", "Efusion"], "--label 'Efusion' is not a known finding; use one of No Finding, Atelectasis, "),
    (["--sex", "X"], "--sex 'X' is not known; use one of F, M"),
])
def test_generate_refuses_unknown_labels_in_one_line(conditional_run, tmp_path, monkeypatch, capsys, args, message):
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--run", str(conditional_run), "--out", str(tmp_path), *args)
    assert code != 0 and message in err and "Traceback" not in err


def test_generate_refuses_labels_for_an_unconditional_model(tmp_path, monkeypatch, capsys, medsyngan_cache):
    _train(monkeypatch, capsys, tmp_path / "plain")
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--run", str(tmp_path / "plain"), "--out",
                        str(tmp_path / "out"), "--view", "PA")
    assert code != 0 and "this model is unconditional" in err and "Traceback" not in err
    G, _ = load_generator(tmp_path / "plain")
    with pytest.raises(UserError, match="unconditional"):
        generate_images(G, 2, seed=0, labels=torch.zeros(22))


# --- a toy problem: the label changes something visible ---------------------------------------------------------

def _toy_films(views: np.ndarray, seed: int) -> np.ndarray:
    """32-px films of soft noise with a bright square: top left on AP films, bottom right on PA films."""
    rng = np.random.default_rng(seed)
    films = rng.normal(90, 12, (len(views), 32, 32))
    for i, view in enumerate(views):
        corner = (slice(4, 14), slice(4, 14)) if view == "AP" else (slice(18, 28), slice(18, 28))
        films[i][corner] = rng.normal(220, 12, (10, 10))
    return np.clip(films, 0, 255).astype(np.uint8)


@pytest.mark.slow
def test_a_conditional_model_draws_what_each_label_shows():
    layout = LabelLayout.of(["view"])
    views = np.array(["PA", "AP"] * 96)
    films = _toy_films(views, seed=0)
    labels = layout.encode_records([()] * len(views), views, [""] * len(views), [-1] * len(views))
    cfg_items = ["model.resolution=32", "data.size=32", "model.ngf=16", "model.ndf=16", "model.z_dim=16",
                 "train.batch_size=32", "train.amp=off", "model.condition=['view']", "run.seed=3"]
    from medsyngan.config import load_config

    cfg = load_config("dcgan64", cfg_items)
    torch.manual_seed(0)
    trainer = GANTrainer(cfg, device="cpu")
    trainer.set_label_source(JointLabels.count(layout, labels))
    loader = BatchLoader(films, 32, seed=0, labels=labels)
    for _ in range(300):
        trainer.train_step(loader.__next__)

    target = (views == "AP").astype(int)
    judge = train_classifier(films, target[:, None], ClassifierSettings(epochs=0, min_steps=80), seed=0)
    held_out = _toy_films(np.array(["PA", "AP"] * 32), seed=1)
    assert balanced_accuracy(predict(judge, held_out)[:, 0], np.array([0, 1] * 32)) > 0.95
    asked = np.array([0] * 64 + [1] * 64)
    G = trainer.G.eval()
    G.label_groups = layout.groups
    pa, ap = (torch.from_numpy(layout.encode([], v)) for v in ("PA", "AP"))
    fake = np.concatenate([generate_images(G, 64, seed=5, labels=pa), generate_images(G, 64, seed=5, labels=ap)])
    scores = predict(judge, fake)[:, 0]
    assert auroc(scores, asked) > 0.9 and balanced_accuracy(scores, asked) > 0.8
