"""Phantoms: anatomy where it belongs (checked on the pixels), the film-to-film variation doing what it says,
NIH layout, findings as labels, determinism."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from medsyngan.config import load_config
from medsyngan.data.nih import read_nih
from medsyngan.data.imageio import image_grid
from medsyngan.data.phantoms import Anatomy, plan_phantoms, render, sample_anatomy, sample_shot, write_phantoms
from medsyngan.errors import UserError

S = 128


def _box(img: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> float:
    """Mean of a region given in the phantom's coordinates (x from -0.5 to 0.5, y from 0 to 1)."""
    s = img.shape[0]
    return float(img[int(y0 * s) : int(y1 * s), int((x0 + 0.5) * s) : int((x1 + 0.5) * s)].mean())


def _neutral_shot(rng: np.random.Generator, **changes):
    """A centred PA film with a mid exposure and nothing on the patient, so that anatomy lies where the boxes
    look; a test that is about one of these settings changes it back."""
    shot = replace(sample_shot(rng), angle=0.0, shift=(0.0, 0.0), zoom=1.0, mu=1.85, gamma=1.0, contrast=1.0,
                   level=0.0, blur=0.002, shutters=(0.0, 0.0, 0.0, 0.0), marker=None,
                   leads=np.zeros((0, 2), np.float32), line=None)
    return replace(shot, **changes)


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    records = write_phantoms(out, patients=12, images_per_patient=2, size=S, seed=3, workers=1)
    return out, records


@pytest.mark.parametrize("seed", range(6))
def test_lungs_are_darker_than_mediastinum_and_heart_sits_on_the_left(seed):
    rng = np.random.default_rng(seed)
    img = render(sample_anatomy(rng, findings_rate={}, female=seed % 2 == 1), _neutral_shot(rng), S).astype(float)
    right_lung = _box(img, -0.28, -0.14, 0.3, 0.5)   # patient's right = image left
    left_lung = _box(img, 0.16, 0.28, 0.3, 0.45)
    mediastinum = _box(img, -0.03, 0.03, 0.25, 0.5)
    abdomen = _box(img, -0.3, 0.3, 0.9, 0.98)
    above_shoulder = _box(img, -0.5, -0.42, 0.0, 0.03)
    assert right_lung < mediastinum - 30 and left_lung < mediastinum - 30
    assert abdomen > right_lung + 40
    assert above_shoulder < right_lung
    # Heart shadow on the patient's left (image right): the lower left lung field is brighter than the right.
    assert _box(img, 0.08, 0.16, 0.58, 0.66) > _box(img, -0.16, -0.08, 0.58, 0.66) + 20


def test_written_films_vary_like_a_hospital_archive(phantom_set, tmp_path):
    """Positioning, exposure and processing differ between films, follow-ups included; lungs stay darker than the
    midline in every one of them."""
    out, records = phantom_set
    imgs = np.stack([np.asarray(Image.open(out / "images" / r.name)) for r in records]).astype(float)
    Image.fromarray(image_grid(list(imgs.astype(np.uint8)), 6, pad=0)).save(tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size == (6 * S, 4 * S)
    lungs = np.array([min(_box(i, -0.3, -0.12, 0.3, 0.5), _box(i, 0.14, 0.3, 0.3, 0.5)) for i in imgs])
    midline = np.array([_box(i, -0.04, 0.04, 0.25, 0.55) for i in imgs])
    assert (lungs < midline - 20).all(), (lungs, midline)
    means = imgs.mean((1, 2))
    assert means.std() > 10  # NIH films' mean brightness spreads by about 24 grey levels
    first, follow = imgs[0::2], imgs[1::2]  # two films of each patient
    assert np.abs(first - follow).mean() > 5


def test_ribs_make_a_periodic_profile_across_the_lung():
    rng = np.random.default_rng(0)
    anatomy = sample_anatomy(rng, findings_rate={})
    img = render(anatomy, _neutral_shot(rng), 256).astype(float)
    column = img[int(0.2 * 256) : int(0.6 * 256), int((-0.2 + 0.5) * 256)]
    spectrum = np.abs(np.fft.rfft(column - column.mean()))
    period_px = anatomy.rib_gap * 256
    peak = int(np.argmax(spectrum[2:])) + 2
    assert abs(len(column) / peak - period_px) < 0.35 * period_px


def test_findings_are_drawn_and_recorded():
    rng = np.random.default_rng(5)
    base = sample_anatomy(rng, findings_rate={})
    shot = _neutral_shot(rng)
    normal = render(base, shot, S).astype(float)
    big = Anatomy(**{**base.__dict__, "heart_a": base.heart_a * 1.35, "findings": ("Cardiomegaly",)})
    assert _box(render(big, shot, S).astype(float), 0.14, 0.22, 0.5, 0.7) > _box(normal, 0.14, 0.22, 0.5, 0.7) + 8
    nodule = Anatomy(**{**base.__dict__, "nodule": (-0.2, 0.4, 0.025), "findings": ("Nodule",)})
    assert _box(render(nodule, shot, S).astype(float), -0.21, -0.19, 0.39, 0.41) > _box(normal, -0.21, -0.19, 0.39, 0.41) + 10
    effusion = Anatomy(**{**base.__dict__, "effusion": (1, 0.14), "findings": ("Effusion",)})
    y = base.dia_y + base.dia_left_drop - 0.02
    assert _box(render(effusion, shot, S).astype(float), 0.22, 0.3, y - 0.03, y) > _box(normal, 0.22, 0.3, y - 0.03, y) + 15


def test_film_settings_do_what_they_say():
    rng = np.random.default_rng(8)
    anatomy = sample_anatomy(rng, findings_rate={})
    plain = _neutral_shot(rng)
    base = render(anatomy, plain, S).astype(float)
    # Collimation: the shuttered margin is nearly black.
    shuttered = render(anatomy, replace(plain, shutters=(0.1, 0.0, 0.0, 0.0)), S).astype(float)
    assert _box(shuttered, -0.5, -0.42, 0.3, 0.7) < 0.2 * _box(base, -0.5, -0.42, 0.3, 0.7) + 3
    assert _box(shuttered, 0.1, 0.3, 0.3, 0.7) == pytest.approx(_box(base, 0.1, 0.3, 0.3, 0.7), abs=1)
    # The burned-in marker is a bright letter where it is placed.
    marked = render(anatomy, replace(plain, marker=(-0.4, 0.05, 0.04)), S).astype(float)
    corner = (slice(int(0.05 * S), int(0.09 * S)), slice(int(0.1 * S), int(0.12 * S)))
    assert marked[corner].max() > 240 > base[corner].max()
    # A portable AP film magnifies the heart: its right border moves out.
    ap = render(anatomy, replace(plain, ap=True), S).astype(float)
    assert _box(ap, 0.16, 0.24, 0.55, 0.65) > _box(base, 0.16, 0.24, 0.55, 0.65) + 5
    # Electrodes and a catheter are radio-opaque: bright where they lie.
    leads = render(anatomy, replace(plain, leads=np.array([[-0.2, 0.4]], np.float32)), S).astype(float)
    assert _box(leads, -0.205, -0.195, 0.395, 0.405) > _box(base, -0.205, -0.195, 0.395, 0.405) + 30
    line = render(anatomy, replace(plain, line=(-0.15, 0.5, 0.0)), S).astype(float)
    assert (line - base)[int(0.45 * S) : int(0.5 * S)].max() > 30
    # Blur takes edge energy away; a brighter level and more contrast do what a display window does.
    blurred = render(anatomy, replace(plain, blur=0.02), S).astype(float)
    assert np.abs(np.diff(blurred, n=2, axis=1)).mean() < 0.5 * np.abs(np.diff(base, n=2, axis=1)).mean()
    assert render(anatomy, replace(plain, level=0.1), S).mean() > base.mean() + 15
    assert render(anatomy, replace(plain, contrast=1.3), S).astype(float).std() > base.std() * 1.15


def test_nih_layout_is_read_by_the_nih_reader(phantom_set):
    out, records = phantom_set
    cat = read_nih(out)
    assert cat.names == [r.name for r in records] and all(p is not None for p in cat.paths)
    assert [tuple(lab) for lab in cat.labels] == [r.labels for r in records]
    assert set(cat.views.tolist()) <= {"PA", "AP"}
    train = set(cat.patients[cat.splits == "train_val"].tolist())
    test = set(cat.patients[cat.splits == "test"].tolist())
    assert train and test and not train & test
    header = (out / "Data_Entry_2017_v2020.csv").read_text().splitlines()[0]
    assert header.startswith("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position")


def test_same_seed_same_images_and_follow_ups_differ_a_little():
    a = plan_phantoms(3, 3, seed=1)
    b = plan_phantoms(3, 3, seed=1)
    first, follow = render(a[0][1], a[0][2], 64), render(a[1][1], a[1][2], 64)
    np.testing.assert_array_equal(first, render(b[0][1], b[0][2], 64))
    other_patient = render(a[3][1], a[3][2], 64)
    same_diff = np.abs(first.astype(int) - follow).mean()
    assert 0 < same_diff < np.abs(first.astype(int) - other_patient).mean() * 2
    rates = [r.labels for r, _, _ in plan_phantoms(400, 1, seed=0)]
    for finding in ("Nodule", "Effusion", "Cardiomegaly"):
        assert 0.06 < sum(finding in labs for labs in rates) / 400 < 0.2


def test_load_training_data_builds_once_and_checks_size(tmp_path, monkeypatch):
    from medsyngan.data.api import load_training_data

    monkeypatch.setenv("MEDSYNGAN_CACHE", str(tmp_path))
    cfg = load_config(None, ["data.phantom_patients=4", "data.phantom_images_per_patient=2", "data.size=32",
                             "model.resolution=32", "data.seed=9"])
    ds = load_training_data(cfg)
    assert ds.images.shape == (8, 32, 32) and len(set(ds.patients.tolist())) == 4
    stamp = (ds.root / "images.u8").stat().st_mtime_ns
    again = load_training_data(cfg)
    assert again.root == ds.root and (again.root / "images.u8").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again.images, ds.images)
    prepared = load_config(None, ["data.source=prepared", f"data.path={ds.root}"])  # 64 px model
    with pytest.raises(UserError, match="32 px but model.resolution is 64"):
        load_training_data(prepared)
    with pytest.raises(UserError, match="data.path is empty"):
        load_training_data(load_config(None, ["data.source=prepared"]))
