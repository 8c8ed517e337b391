"""The public source made of the phantoms and the public COVID-19 films (data.source = "phantoms+covid-cxr"): every
film of each part once, no patient shared between the parts, built once into the cache and rebuilt when a part
changes; a public source of the experiments. The COVID-19 part is a small folder of the same layout made here."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsyngan.config import load_config
from medsyngan.data import union
from medsyngan.data.api import covid_dataset, load_training_data, phantom_dataset, public_mix_dataset
from medsyngan.data.prepared import MANIFEST_FILE, UNKNOWN_AGE
from medsyngan.data.shared import COVID_CXR_FOLDER, SHARED_DATA_ENV
from medsyngan.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SIZE, PATIENTS, PER_PATIENT = 32, 4, 2
# image, patient, labels, view, sex, age, split — patient "1" is also a phantom patient's id
FILMS = [
    ("images/a.png", "1", "COVID-19", "AP", "M", "61", "train_val"),
    ("images/b.png", "1", "COVID-19", "AP", "M", "61", "train_val"),
    ("images/c.png", "9f3e", "COVID-19|Effusion", "PA", "F", "", "train_val"),
    ("images/d.png", "77aa", "No Finding", "PA", "", "45", "test"),
    ("images/e.png", "77aa", "COVID-19", "AP", "", "45", "test"),
]


def _write_films(folder: Path, films: list[tuple[str, ...]]) -> None:
    rng = np.random.default_rng(len(films))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = ["image,patient,labels,view,sex,age,split"]
    for film in films:
        Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(folder / film[0])
        lines.append(",".join(film))
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def shared(tmp_path, monkeypatch) -> Path:
    """A shared data folder holding a small COVID-19 set, and a cache of this test's own."""
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path / "shared"))
    monkeypatch.setenv("MEDSYNGAN_CACHE", str(tmp_path / "cache"))
    _write_films(tmp_path / "shared" / COVID_CXR_FOLDER, FILMS)
    return tmp_path / "shared" / COVID_CXR_FOLDER


def _mixed(*overrides: str):
    return load_config("public-mixed64", [f"data.size={SIZE}", f"model.resolution={SIZE}",
                                          f"data.phantom_patients={PATIENTS}",
                                          f"data.phantom_images_per_patient={PER_PATIENT}", *overrides])


def _parts(seed: int = 0):
    return {"phantoms": phantom_dataset(PATIENTS, PER_PATIENT, SIZE, seed), "covid-cxr": covid_dataset(SIZE)}


def test_the_union_holds_every_film_of_both_parts_once_with_their_own_metadata(shared):
    mixed = load_training_data(_mixed())
    phantoms, covid = phantom_dataset(PATIENTS, PER_PATIENT, SIZE, 0), covid_dataset(SIZE)
    assert (len(phantoms), len(covid), len(mixed)) == (PATIENTS * PER_PATIENT, len(FILMS), 13)
    for rows, part, name in ((slice(0, 8), phantoms, "phantoms"), (slice(8, 13), covid, "covid-cxr")):
        assert np.array_equal(mixed.images[rows], part.images)
        assert mixed.image_names[rows] == [f"{name}/{image}" for image in part.image_names]
        assert mixed.patients[rows].tolist() == [f"{name}:{patient}" for patient in part.patients]
        assert mixed.labels[rows] == part.labels
        for column in ("views", "splits", "sexes", "ages"):
            assert np.array_equal(getattr(mixed, column)[rows], getattr(part, column)), column
    # the COVID-19 patient "1" and the phantom patient "1" stay two patients
    assert "1" in set(phantoms.patients) and "1" in set(covid.patients)
    assert len(np.unique(mixed.patients)) == PATIENTS + 3
    assert not {p for p in mixed.patients[:8]} & {p for p in mixed.patients[8:]}
    assert mixed.labels[10] == ("COVID-19", "Effusion") and mixed.labels[11] == ()
    assert mixed.ages[8] == 61 and mixed.ages[10] == UNKNOWN_AGE and mixed.sexes[11] == ""
    assert mixed.manifest["parts"]["covid-cxr"]["count"] == len(FILMS)


@pytest.mark.parametrize("split", ["train_val", "test"])
def test_a_split_of_the_union_is_that_split_of_each_part(shared, split):
    mixed = load_training_data(_mixed(f'data.split="{split}"'))
    parts = _parts()
    expected = [f"{name}/{image}" for name, part in parts.items()
                for image, s in zip(part.image_names, part.splits) if s == split]
    assert mixed.image_names == expected and set(mixed.splits) == {split}
    assert any(n.startswith("phantoms/") for n in expected) and any(n.startswith("covid-cxr/") for n in expected)


def test_a_changed_part_builds_a_new_union_and_an_unchanged_one_is_reused(shared):
    first = public_mix_dataset(PATIENTS, PER_PATIENT, SIZE, 0)
    assert public_mix_dataset(PATIENTS, PER_PATIENT, SIZE, 0).root == first.root
    other_phantoms = public_mix_dataset(PATIENTS, PER_PATIENT, SIZE, 1)  # data.seed draws other phantoms
    assert other_phantoms.root != first.root
    assert not np.array_equal(other_phantoms.images[:8], first.images[:8])
    _write_films(shared, FILMS + [("images/f.png", "5b", "COVID-19", "PA", "F", "30", "train_val")])
    grown = public_mix_dataset(PATIENTS, PER_PATIENT, SIZE, 0)
    assert grown.root != first.root and len(grown) == len(first) + 1
    assert grown.patients[-1] == "covid-cxr:5b"
    assert union.union_key(_parts()) == grown.root.name


def test_concurrent_callers_build_the_union_once(shared, monkeypatch):
    parts, root = _parts(), shared.parent / "unions"
    write, calls = union._write_union, []

    def slow_write(*args):
        calls.append(threading.get_ident())
        time.sleep(0.3)  # the others arrive while the first is still writing
        write(*args)

    monkeypatch.setattr(union, "_write_union", slow_write)
    opened: list = []
    threads = [threading.Thread(target=lambda: opened.append(union.union_dataset(parts, root))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(opened) == 4
    assert all(ds.image_names == opened[0].image_names and np.array_equal(ds.images, opened[0].images)
               for ds in opened)
    assert sorted(p.name for p in root.iterdir()) == sorted([opened[0].root.name, f"{opened[0].root.name}.lock"])


def test_a_build_that_fails_leaves_no_half_written_union(shared, monkeypatch):
    parts, root = _parts(), shared.parent / "unions"
    write = union._write_union

    def failing_write(parts, folder, key):
        write(parts, folder, key)
        raise OSError("disk full")

    monkeypatch.setattr(union, "_write_union", failing_write)
    with pytest.raises(OSError, match="disk full"):
        union.union_dataset(parts, root)
    assert [p.name for p in root.iterdir()] == [f"{union.union_key(parts)}.lock"]
    monkeypatch.setattr(union, "_write_union", write)
    assert len(union.union_dataset(parts, root)) == 13 and (root / union.union_key(parts) / MANIFEST_FILE).is_file()


def test_parts_of_two_sizes_are_refused(shared):
    parts = {"phantoms": phantom_dataset(PATIENTS, PER_PATIENT, SIZE, 0), "covid-cxr": covid_dataset(16)}
    with pytest.raises(UserError, match="differ in image size .*phantoms 32 px, covid-cxr 16 px.*one data.size"):
        union.union_dataset(parts, shared.parent / "unions")


def test_without_the_covid_folder_the_error_is_covid_cxrs(tmp_path, monkeypatch):
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path / "empty"))
    monkeypatch.setenv("MEDSYNGAN_CACHE", str(tmp_path / "cache"))
    for source in ("covid-cxr", "phantoms+covid-cxr"):
        with pytest.raises(UserError, match="the COVID-19 CXR set .* is not there; set MEDSYNGAN_SHARED_DATA"):
            load_training_data(_mixed(f'data.source="{source}"'))


def test_the_union_is_a_public_source_of_the_experiments_and_private_rows_start_from_it(tmp_path):
    from medsyngan.workflows.experiment import PUBLIC_SOURCES, Workspace, load_experiment

    assert "phantoms+covid-cxr" in PUBLIC_SOURCES
    eps = load_experiment(REPO / "experiments" / "nih-64-eps")
    ws = Workspace(eps, tmp_path, tmp_path / "data" / "train", eps.study.budget)
    public = ws.plan("public-mixed", 0)
    assert public.public_data and public.cfg.data.source == "phantoms+covid-cxr" and public.cfg.data.path == ""
    assert public.folder == tmp_path / "runs" / "public-mixed-s0"
    tuning = Workspace(eps, tmp_path, tmp_path / "tune", eps.study.budget, "tuning")
    assert tuning.plan("public-mixed", 0) == public  # one public run serves the study and the tuning
    assert tuning.plan("mixed-head", 0).cfg.train.init_from == str(public.folder)
    private = ws.plan("eps-1-mixed", 0).cfg
    assert private.train.init_from == str(public.folder) and private.model == public.cfg.model
    assert not ws.plan("eps-1-mixed", 0).public_data and private.privacy.target_epsilon == 1.0
    preset = load_config("public-mixed64")
    assert preset.data.source == "phantoms+covid-cxr" and preset.model == load_config("federated-dcgan64").model


def test_the_real_covid_films_and_the_phantoms_make_the_presets_union(medsyngan_cache, covid_dir):
    mixed = load_training_data(load_config("public-mixed64", ["data.size=32", "model.resolution=32"]))
    assert len(mixed) == 600 + 243 and len(np.unique(mixed.patients)) == 200 + 71
    assert sum(p.startswith("covid-cxr:") for p in mixed.patients) == 243
