"""The GAN families studies: the NIH families' federated rows (the centralized rows' networks, augmentation at a fixed
p), the 128-px study on the public COVID-19 films (its patient-disjoint split, every family at the same budget, a
--quick end-to-end run) and what a study's films may be."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medsyngan.errors import UserError
from medsyngan.training.schedule import GrowthSchedule, check_run_length
from medsyngan.workflows.experiment import Workspace, load_experiment
from medsyngan.workflows.recipes import planned_images
from test_study import _study

REPO = Path(__file__).resolve().parents[1]
FAMILIES = REPO / "experiments" / "nih-64-families"
COVID = REPO / "experiments" / "covid-128-families"


def _plans(folder: Path, tmp_path: Path, quick: bool = False):
    exp = load_experiment(folder)
    ws = Workspace(exp, tmp_path, tmp_path / "data" / "train", exp.study.quick if quick else exp.study.budget)
    return exp, {name: ws.plan(name, 0) for name in exp.study.rows}


def test_federated_family_rows_train_the_centralized_networks_across_three_hospitals(tmp_path):
    exp, plans = _plans(FAMILIES, tmp_path)
    federated = [name for name in exp.study.rows if name.startswith("fed-")]
    at_budget = {name for name in exp.study.rows if name not in federated and not exp.book[name].images_through_d}
    assert {name.removeprefix("fed-") for name in federated} == at_budget  # every centralized row of the budget
    for name in federated:
        cfg, central = plans[name].cfg, plans[name.removeprefix("fed-")].cfg
        assert cfg.model == central.model and cfg.train.batch_size == central.train.batch_size
        f = cfg.federated
        assert f.enabled and (f.hospitals, f.scheme, f.quorum) == (3, "patient", 3)
        assert not (cfg.privacy.dp or cfg.privacy.secagg or cfg.privacy.encrypt)
        # The study's 3,200 images, rounded down to a whole number of federated steps (48 images each).
        assert planned_images(cfg) == 3168 == 3200 // 48 * 48
        if name.endswith("-ada"):  # adaptive p is refused in a federation: one fixed p, sent by the server
            assert (cfg.train.augment, cfg.train.ada_target, cfg.train.augment_p) == ("ada", 0.0, 0.2)
        else:
            assert cfg.train.augment == "none"


def test_federated_progan_grows_to_64_px_over_the_same_share_of_its_run(tmp_path):
    _, plans = _plans(FAMILIES, tmp_path)
    central = plans["progan"].cfg
    for name in ("fed-progan", "fed-progan-ada"):
        cfg = plans[name].cfg
        check_run_length(cfg)  # the schedule counts a hospital's own images: its steps, not the federation's
        schedule, steps = GrowthSchedule.of(cfg), cfg.federated.rounds * cfg.federated.local_steps
        assert schedule.stage(schedule.advance(0, steps)) == (64, 1.0)
        assert cfg.train.kimg_per_phase == pytest.approx(central.train.kimg_per_phase / 3, rel=0.01)


def test_every_covid_row_trains_at_128_px_on_the_same_images(tmp_path):
    exp, plans = _plans(COVID, tmp_path)
    assert (exp.study.films, exp.study.size) == ("covid-cxr", 128)
    assert {p.cfg.model.arch for p in plans.values()} == {"dcgan", "progan", "stylegan2", "stylegan3"}
    for run in plans.values():
        cfg = run.cfg
        assert cfg.model.resolution == cfg.data.size == 128 and cfg.data.source == "prepared"
        assert planned_images(cfg) == exp.study.budget.images_through_d and cfg.train.batch_size == 16
    progan = plans["progan"].cfg
    schedule = GrowthSchedule.of(progan)
    end = schedule.advance(0, progan.train.steps)
    assert end == exp.study.budget.images_through_d  # one batch size at every stage
    assert schedule.stage(end) == (128, 1.0) and end - 2 * schedule.doublings * schedule.phase_images > 0
    assert plans["stylegan2-ada"].cfg.train.augment == "ada"


def test_a_study_of_nih_films_at_another_size_is_refused(tmp_path):
    text = (FAMILIES / "study.toml").read_text().replace('name = "nih-64-families"', 'name = "x"\nsize = 128')
    (tmp_path / "study.toml").write_text(text)
    for row in load_experiment(FAMILIES).study.rows:
        (tmp_path / f"{row}.toml").write_text((FAMILIES / f"{row}.toml").read_text())
    with pytest.raises(UserError, match="64-px films; set size = 64"):
        load_experiment(tmp_path)


def test_quick_covid_study_scores_on_held_out_covid_patients(tmp_path, medsyngan_cache, covid_dir):
    from medsyngan.data.prepared import PreparedDataset

    report = _study().run_study(quick=True, seeds=[0], out=tmp_path / "study", docs=tmp_path / "docs",
                                experiment=COVID)
    train = PreparedDataset.open(tmp_path / "study" / "data" / "train")
    evaluation = PreparedDataset.open(tmp_path / "study" / "data" / "eval")
    assert train.size == evaluation.size == 128
    assert not set(train.patients.tolist()) & set(evaluation.patients.tolist())
    assert len(train) + len(evaluation) == 243  # every film of the public set, in one of the two
    split = report["split"]
    assert split["eval_patients"] == round(0.25 * (split["eval_patients"] + split["train_patients"]))
    (run,) = report["runs"]
    assert run["config"] == "dcgan" and run["kimg"] * 1000 == load_experiment(COVID).study.quick.images_through_d
    assert np.isfinite(run["metrics"]["fd24_128_random"])
    assert (tmp_path / "docs" / "results" / "covid-128-families-dcgan.png").is_file()
