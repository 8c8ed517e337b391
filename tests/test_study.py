"""The NIH study: its recipes as data (every row at the budget's images through D), patient-disjoint splits,
target checks, tuning tables and a --quick end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # study_tables, as the study script imports it
needs_nih = pytest.mark.usefixtures("nih_dir")  # skips where the sample is missing, fails under CI


def _study():
    spec = importlib.util.spec_from_file_location("study_nih", REPO / "benchmarks" / "study_nih.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exp():
    from medsyngan.workflows.experiment import load_experiment

    return load_experiment(REPO / "experiments" / "nih-64")


def _workspace(exp, tmp_path, budget, runs="runs"):
    from medsyngan.workflows.experiment import Workspace

    return Workspace(exp, tmp_path, tmp_path / "data" / "train", budget, runs)


@pytest.mark.parametrize("budget_name", ["budget", "quick", "budget x4"])
def test_every_row_gets_the_budget_of_images_through_d(exp, tmp_path, budget_name):
    from medsyngan.workflows.recipes import planned_images

    name, _, factor = budget_name.partition(" x")
    budget = getattr(exp.study, name).scaled(int(factor or 1))
    ws = _workspace(exp, tmp_path, budget)
    for row in exp.study.rows:
        cfg = ws.plan(row, 3).cfg
        assert planned_images(cfg) == budget.images_through_d, row
        assert (cfg.model.ngf, cfg.eval.num_samples) == (budget.width, budget.samples)
    # A longer budget trains longer, in rounds for a federated row and in steps for a centralized one.
    if factor:
        base = _workspace(exp, tmp_path, exp.study.budget)
        assert ws.plan("fed-patient", 3).cfg.federated.rounds == 4 * base.plan("fed-patient", 3).cfg.federated.rounds
        assert ws.plan("centralized", 3).cfg.train.steps == 4 * base.plan("centralized", 3).cfg.train.steps


def test_a_study_seed_sets_the_training_and_the_data_seed(exp, tmp_path):
    ws = _workspace(exp, tmp_path, exp.study.budget)
    cfg = ws.plan("fed-labelskew", 5).cfg
    assert (cfg.run.seed, cfg.data.seed) == (5, 5)  # another seed: other weights and another hospital partition
    assert cfg.data.path == str(tmp_path / "data" / "train") and cfg.data.source == "prepared"


def test_rows_start_from_the_public_run_of_their_seed(exp, tmp_path):
    ws = _workspace(exp, tmp_path, exp.study.budget)
    warm = ws.plan("fed-dp10-warm", 3)
    assert warm.cfg.train.init_from == str(tmp_path / "runs" / "public-s3")
    assert ws.plan("public", 3).public_data and not warm.public_data
    # The public model never reads the work folder's data: the tuning split's runs start from the same one.
    from medsyngan.workflows.experiment import Workspace

    tuning = Workspace(exp, tmp_path, tmp_path / "data" / "tune-train", exp.study.budget, runs="tuning")
    assert tuning.plan("public", 3).plan == ws.plan("public", 3).plan
    assert tuning.plan("fed-dp10-warm", 3).cfg.train.init_from == warm.cfg.train.init_from
    assert warm.cfg.train.d_steps_per_g == 5 and warm.cfg.privacy.mean_image_size == 16  # the tuned recipe
    assert ws.plan("centralized", 3).cfg.train.init_from == ""


def test_a_relative_label_table_is_a_folder_of_the_work_folder(eps, tmp_path):
    from medsyngan.workflows.experiment import Workspace

    tuning = Workspace(eps, tmp_path, tmp_path / "data" / "tune-train", eps.study.budget, runs="tuning")
    cfg = tuning.plan("all-d-donated-labels", 0).cfg
    assert cfg.train.label_source == "public" and cfg.train.label_table == str(tmp_path / "data" / "tune-train")
    assert tuning.plan("eps-inf", 0).cfg.train.label_table == ""  # the default table: the NIH release's


def test_a_run_copied_from_another_work_folder_of_the_study_is_the_same_run(exp, tmp_path):
    here = _workspace(exp, tmp_path / "here", exp.study.budget).plan("fed-dp10-warm", 0)
    there = _workspace(exp, tmp_path / "there", exp.study.budget).plan("fed-dp10-warm", 0)
    assert here.plan != there.plan and here.planned_as(there.plan)  # paths differ only in the work folder
    other_seed = _workspace(exp, tmp_path / "there", exp.study.budget).plan("fed-dp10-warm", 1)
    assert not here.planned_as(other_seed.plan) and not here.planned_as(None)
    from medsyngan.workflows.experiment import Workspace

    other_data = Workspace(exp, tmp_path / "there", tmp_path / "there" / "data" / "tune-train", exp.study.budget)
    assert not here.planned_as(other_data.plan("fed-dp10-warm", 0).plan)


def test_tuning_variants_resolve_on_the_tuning_split(exp, tmp_path):
    from medsyngan.workflows.recipes import planned_images

    ws = _workspace(exp, tmp_path, exp.study.budget, runs="tuning")
    assert len(exp.variants) > 50 and all(v.question for v in exp.variants)
    for variant in exp.variants:
        run = ws.plan(variant.name, 0)
        wanted = exp.book.images_through_d(variant.name) or exp.study.budget.images_through_d
        assert planned_images(run.cfg) == wanted, variant.name
        assert run.folder.parent.name == ("runs" if run.public_data else "tuning")
    # A variant of the public model lives beside the study's, and the variants from it start from it.
    assert ws.plan("public-adam-0.5", 2).folder == tmp_path / "runs" / "public-adam-0.5-s2"
    from_it = ws.plan("fed-dp10-warm-no-mean-image-from-public-adam-0.5", 2).cfg
    assert from_it.train.init_from == str(tmp_path / "runs" / "public-adam-0.5-s2")
    assert from_it.privacy.mean_image_size == 0 and from_it.train.beta1 == 0.5  # β of fed-dp10 (the preset's)
    half = ws.plan("public-adam-0.5-half-budget", 0).cfg
    assert half.train.steps == ws.plan("public", 0).cfg.train.steps // 2


def test_a_resolved_recipe_is_kept_and_a_changed_one_retrained(exp, tmp_path, monkeypatch):
    from medsyngan.workflows import runner

    trained = []
    monkeypatch.setattr(runner, "train", lambda cfg, run_dir, resume=False: trained.append(cfg.run.name))
    ws = _workspace(exp, tmp_path, exp.study.quick)
    warm = ws.plan("centralized-warm", 1)
    ws.ensure(warm)
    assert trained == ["study-public-s1", "study-centralized-warm-s1"]  # the start first
    ws.ensure(warm)
    assert len(trained) == 2  # nothing changed: kept
    ws.ensure(warm, retrain=True)
    assert trained[-1] == "study-centralized-warm-s1" and len(trained) == 3  # retrained; the public run kept
    longer = _workspace(exp, tmp_path, exp.study.quick.scaled(2))
    longer.ensure(longer.plan("centralized-warm", 1))
    assert trained[3:] == ["study-public-s1", "study-centralized-warm-s1"]  # another plan: both retrained


def test_a_recipe_that_misses_the_budget_is_refused(exp, tmp_path):
    from medsyngan.errors import UserError

    odd = exp.study.budget.model_copy(update={"images_through_d": 19201})
    with pytest.raises(UserError, match="do not divide the budget of 19201"):
        _workspace(exp, tmp_path, odd).plan("centralized", 0)


def test_holdout_is_a_fixed_fraction_of_patients():
    from medsyngan.workflows.split import holdout_patients

    patients = np.repeat(np.array([f"p{i}" for i in range(50)]), 3)
    held = holdout_patients(patients, 0.2, seed=5)
    assert len(held) == 10 and held <= set(patients.tolist())
    assert held == holdout_patients(patients, 0.2, seed=5)
    assert held != holdout_patients(patients, 0.2, seed=6)
    assert len(holdout_patients(np.array(["a", "b"]), 0.9, seed=0)) == 1  # never every patient


def test_an_identical_subset_is_left_in_place_and_a_changed_one_replaced(tmp_path, medsyngan_cache):
    from medsyngan.data.api import phantom_dataset
    from medsyngan.data.prepared import PreparedDataset
    from medsyngan.workflows.split import split_patients, write_subset

    ds = phantom_dataset(6, 2, 32, seed=1)
    out = write_subset(ds, np.arange(4), tmp_path / "train", "train", {"seed": 1})
    marker = out / "kept"
    marker.write_text("")
    write_subset(ds, np.arange(4), tmp_path / "train", "train", {"seed": 1})
    assert marker.exists()  # not rebuilt
    write_subset(ds, np.arange(6), tmp_path / "train", "train", {"seed": 1})
    assert not marker.exists() and len(PreparedDataset.open(out)) == 6
    counts = split_patients(ds, 0.5, 3, tmp_path / "a", tmp_path / "b", ("a", "b"))
    a, b = PreparedDataset.open(tmp_path / "a"), PreparedDataset.open(tmp_path / "b")
    assert counts == {"a_images": 6, "b_images": 6, "a_patients": 3, "b_patients": 3}
    assert not set(a.patients.tolist()) & set(b.patients.tolist())


@needs_nih
def test_a_donated_tuning_set_is_disjoint_from_every_rows_training_patients(tmp_path, medsyngan_cache):
    from medsyngan.data.prepared import PreparedDataset
    from medsyngan.workflows.experiment import load_experiment

    study = _study()
    eps = load_experiment(REPO / "experiments" / "nih-64-eps")
    assert eps.study.tuning_split.donated_fraction is not None  # the sweep's choices cost no ε
    rows_train, tune_train, val = study.tuning_split(eps, tmp_path)
    assert rows_train == tmp_path / "data" / "private"
    patients = {name: set(PreparedDataset.open(tmp_path / "data" / name).patients.tolist())
                for name in ("train", "eval", "private", "donated")}
    tuning = set(tune_train.patients.tolist()) | set(val.patients.tolist())
    assert tuning == patients["donated"] and not patients["donated"] & patients["private"]
    assert patients["private"] | patients["donated"] == patients["train"]
    assert not set(tune_train.patients.tolist()) & set(val.patients.tolist())
    assert not patients["train"] & patients["eval"]
    # Without a donated set the tuning patients are the rows' own training patients (experiments/nih-64).
    nih = load_experiment(REPO / "experiments" / "nih-64")
    rows_train, tune_train, val = study.tuning_split(nih, tmp_path / "nih")
    assert rows_train == tmp_path / "nih" / "data" / "train"
    assert set(tune_train.patients.tolist()) | set(val.patients.tolist()) == \
        set(PreparedDataset.open(rows_train).patients.tolist())


def test_targets_compare_against_centralized(exp):
    from study_tables import targets

    cell = lambda v: (v, None)  # noqa: E731
    summary = {
        "centralized": {"FD (rand)": cell(10.0), "near-copies": cell(0.0), "MIA AUC": cell(0.6)},
        "fed-patient": {"FD (rand)": cell(11.0), "near-copies": cell(0.0), "MIA AUC": cell(0.5)},
        "fed-labelskew": {"FD (rand)": cell(16.0), "near-copies": cell(1.0), "MIA AUC": cell(0.5)},
        "fed-dp10": {"FD (rand)": cell(19.0), "near-copies": cell(0.0), "MIA AUC": cell(0.56)},
    }
    checks = {c["target"]: c for c in targets(summary, exp.study)}
    assert checks["FD fed-patient / centralized ≤ 1.2"]["met"] is True
    assert checks["FD fed-labelskew / centralized ≤ 1.5"]["met"] is False
    assert checks["FD fed-dp10 / centralized ≤ 2.0"]["value"] == pytest.approx(1.9)
    assert checks["no near-copies (NN-SSIM > 0.95) in any run"]["met"] is False
    assert checks["MIA AUC fed-dp10 ≤ 0.55"]["met"] is False


def test_rows_from_the_public_model_are_judged_against_both_references(exp):
    from study_tables import targets

    cell = lambda v: (v, None)  # noqa: E731
    summary = {key: {"FD (rand)": cell(fd), "near-copies": cell(0.0), "MIA AUC": cell(0.5)} for key, fd in
               (("centralized", 4.0), ("centralized-warm", 2.0), ("fed-patient-warm", 2.6), ("fed-dp10-warm", 6.0))}
    checks = {c["target"]: c for c in targets(summary, exp.study)}
    assert checks["FD fed-patient-warm / centralized-warm ≤ 1.2"]["met"] is False  # 1.3, not 0.65 against (1)
    assert checks["FD fed-dp10-warm / centralized ≤ 2.0"]["met"] is True
    assert checks["FD fed-dp10-warm / centralized-warm ≤ 2.0"]["value"] == pytest.approx(3.0)
    assert not any("fed-patient /" in target for target in checks)  # no cold row, no cold ratio


def test_fd_targets_carry_medians_and_per_seed_ratios(exp):
    from study_tables import markdown, summarize, targets

    fds = {"centralized": [2.0, 8.0, 3.0], "fed-patient": [3.0, 2.0, 3.3]}
    runs = [{"config": k, "seed": s, "metrics": {"fd_rand500": v}, "epsilon": None, "bytes_sent": 0, "wall_s": 1.0}
            for k, vs in fds.items() for s, v in enumerate(vs)]
    summary = summarize(runs, {"centralized": "(1)", "fed-patient": "(2)"})
    check = next(c for c in targets(summary, exp.study, runs) if c["target"].startswith("FD fed-patient"))
    assert check["value"] == pytest.approx((8.3 / 3) / (13 / 3), abs=1e-3) and check["met"] is True
    assert check["median_ratio"] == pytest.approx(3.0 / 3.0)
    assert check["per_seed"] == {0: 1.5, 1: 0.25, 2: 1.1}
    assert "per seed s0 1.5, s1 0.25, s2 1.1" in markdown(summary, [check])


def test_fd_by_seed_lists_every_run_and_the_median():
    from study_tables import fd_by_seed

    runs = [{"config": key, "seed": seed, "metrics": {"fd500_64_random": value}}
            for key, seed, value in (("centralized", 0, 2.0), ("centralized", 1, 4.0), ("centralized", 2, 9.0),
                                     ("fed-patient", 0, 3.0))]
    lines = fd_by_seed(runs, ["public", "centralized", "fed-patient"]).splitlines()
    assert lines[0] == "| seed | centralized | fed-patient |"
    assert lines[2:] == ["| 0 | 2.00 | 3.00 |", "| 1 | 4.00 | — |", "| 2 | 9.00 | — |", "| median | 4.00 | 3.00 |"]


def test_collect_merges_tuning_folders_in_tuning_order(exp, tmp_path):
    study = _study()
    late, early = exp.variants[5].name, exp.variants[1].name
    for folder, name, fd in (("a", late, 7.5), ("b", early, 2.25)):
        result = tmp_path / folder / "tuning" / f"{name}-s0" / study.TUNING_RESULT_FILE
        result.parent.mkdir(parents=True)
        result.write_text(json.dumps({"config": "public", "variant": name, "seed": 0, "wall_s": 10.0,
                                      "epsilon": None, "metrics": {"fd_rand500": fd, "kid_rand500": 0.01}}))
    table = study.collect_tuning([tmp_path / "a", tmp_path / "b"]).splitlines()
    assert len(table) == 4
    assert early in table[2] and "2.25" in table[2]
    assert late in table[3] and "7.5" in table[3]
    from medsyngan.errors import UserError

    with pytest.raises(UserError, match="no finished tuning runs"):
        study.collect_tuning([tmp_path / "missing"])


def test_a_tuning_table_scored_with_utility_shows_validation_utility_and_detectability():
    from study_tables import tuning_markdown

    metrics = {"fd_rand500": 3.0, "auroc_synth500_64_mean": 0.61, "auroc_synth500_64_mean_lo": 0.5,
               "c2st_auroc63_64": 0.97, "c2st_auroc63_64_lo": 0.9}
    rows = [{"config": "eps-inf", "variant": v, "seed": 0, "wall_s": 5.0, "epsilon": None, "metrics": m}
            for v, m in (("scored", metrics), ("fd only", {"fd_rand500": 4.0}))]
    table = tuning_markdown(rows).splitlines()
    assert "val synthetic-only AUROC | val detectability |" in table[0]
    assert table[2].startswith("| scored | eps-inf | 0 | 3 | — | — | — | — | 0.61 | 0.97 | — | 5 |")
    assert table[3].startswith("| fd only | eps-inf | 0 | 4 | — | — | — | — | — | — |")
    assert "AUROC" not in tuning_markdown(rows[1:])


def test_scale_must_be_a_positive_whole_number(capsys):
    assert _study().main(["--scale", "0"]) == 2
    assert "--scale 0" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--variant", "public-hinge"], ["--diagnose"]])
def test_tuning_folder_options_need_tune(capsys, args):
    assert _study().main(args) == 2
    assert "add --tune" in capsys.readouterr().err


def test_an_unknown_row_or_variant_is_one_line(capsys):
    assert _study().main(["--tune", "--variant", "public-hinj"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no recipe 'public-hinj'" in err and "public-hinge" in err and len(err.splitlines()) == 1


@needs_nih
@pytest.mark.slow
def test_quick_study_end_to_end(exp, tmp_path):
    study = _study()
    report = study.run_study(quick=True, seeds=[0], out=tmp_path / "study", docs=tmp_path / "docs")

    split = report["split"]
    assert split["eval_patients"] == round(0.2 * (split["eval_patients"] + split["train_patients"]))
    from medsyngan.data.prepared import PreparedDataset

    train = PreparedDataset.open(tmp_path / "study" / "data" / "train")
    evaluation = PreparedDataset.open(tmp_path / "study" / "data" / "eval")
    assert not set(train.patients.tolist()) & set(evaluation.patients.tolist())
    assert len(train) == split["train_images"] and len(evaluation) == split["eval_images"]

    assert list(report["summary"]) == exp.study.quick_rows
    runs = {r["config"]: r for r in report["runs"]}
    budget = exp.study.quick.images_through_d
    assert runs["centralized"]["kimg"] * 1000 == budget
    # Poisson patient sampling under DP: the images through D vary around the plan.
    assert runs["fed-dp1-secure-warm"]["kimg"] * 1000 == pytest.approx(budget, rel=0.5)
    for r in runs.values():
        assert np.isfinite(study.pick(r["metrics"], "fd")) and 0 <= r["metrics"]["mia_ganleaks_pixel_auc"] <= 1
        assert Path(r["grid"]).is_file()
    assert runs["centralized"]["epsilon"] is None and runs["centralized"]["bytes_sent"] == 0
    assert 0 < runs["fed-dp1-secure-warm"]["epsilon"] <= 1.0 + 1e-6
    assert runs["fed-dp1-secure-warm"]["bytes_sent"] > 0
    # The phantoms themselves are scored beside the public model trained on them.
    assert np.isfinite(runs["public"]["phantom_metrics"]["fd48_64_random"])
    assert "phantom images themselves (no GAN)" in study.markdown(report["summary"], [])
    # The warm start is a model trained on phantoms only, and the private run began from its weights.
    from medsyngan.config import load_config

    public = load_config(tmp_path / "study" / "runs" / "public-s0" / "config.toml")
    assert public.data.source == "phantoms"
    warm = load_config(tmp_path / "study" / "runs" / "fed-dp1-secure-warm-s0" / "config.toml")
    assert Path(warm.train.init_from) == tmp_path / "study" / "runs" / "public-s0"
    # Each run was scored by evaluate_run: its metrics.json is the study's figures.
    scored = json.loads((tmp_path / "study" / "runs" / "centralized-s0" / "metrics.json").read_text())
    assert scored == runs["centralized"]["metrics"]
    saved = json.loads((tmp_path / "docs" / "results" / "study.json").read_text())
    assert saved["summary"].keys() == report["summary"].keys()
    assert "| (1) centralized, non-private |" in (tmp_path / "study" / "study.md").read_text()

    again = study.run_study(quick=True, seeds=[0], out=tmp_path / "study", reuse=True)  # nothing retrained
    assert [r["metrics"] for r in again["runs"]] == [r["metrics"] for r in report["runs"]]


# ------------------------------------------------------------------ the ε sweep and the public models of real films
EPS = REPO / "experiments" / "nih-64-eps"


@pytest.fixture(scope="module")
def eps():
    from medsyngan.workflows.experiment import load_experiment

    return load_experiment(EPS)


def _flat(cfg) -> dict:
    out = {}
    for section, values in cfg.model_dump().items():
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            out[f"{section}.{key}"] = value
    return out


def test_the_sweep_rows_differ_in_epsilon_only_and_keep_the_products_security(eps, tmp_path):
    ws = _workspace(eps, tmp_path, eps.study.budget)
    reference = _flat(ws.plan("eps-1", 0).cfg)
    allowed = {"privacy.target_epsilon", "hospital.max_epsilon", "run.name"}
    for row, epsilon in zip(eps.study.sweep.rows, eps.study.sweep.epsilons):
        cfg = ws.plan(row, 0).cfg
        differs = {k for k, v in _flat(cfg).items() if reference[k] != v}
        if np.isfinite(epsilon):
            assert differs <= allowed, (row, differs)
            assert cfg.privacy.dp and cfg.privacy.target_epsilon == epsilon == cfg.hospital.max_epsilon
        else:  # no DP-SGD, and its own depth of D (declared in its [chosen_on])
            assert differs <= allowed | {"privacy.dp", "hospital.dp_required", "train.d_trainable_last"}, differs
            assert "train.d_trainable_last" in eps.book[row].chosen_on
            assert not cfg.privacy.dp and not cfg.hospital.dp_required
        p = cfg.privacy
        assert (p.quantize_bits, p.encrypt, p.secagg, cfg.federated.hospitals) == (8, True, True, 3), row
        assert cfg.train.init_from == str(tmp_path / "runs" / "public-s0")
        assert cfg.model.condition == ["findings", "view", "sex"]
    assert ws.plan("eps-1-covid", 0).cfg.train.init_from == str(tmp_path / "runs" / "public-covid-s0")


def test_the_public_models_read_public_data_only_and_match_the_private_networks(eps, exp, tmp_path):
    for folder, names in ((eps, ("public-covid", "public")), (exp, ("public-covid",))):
        ws = _workspace(folder, tmp_path, folder.study.budget)
        for name in names:
            run = ws.plan(name, 0)
            assert run.public_data and run.cfg.data.path == "" and run.cfg.data.source in ("covid-cxr", "phantoms")
    ws = _workspace(exp, tmp_path, exp.study.budget)
    private = ws.plan("fed-dp1-secure-warm-covid", 0).cfg
    assert private.train.init_from == str(tmp_path / "runs" / "public-covid-s0")
    assert private.model == ws.plan("public-covid", 0).cfg.model  # train.init_from needs the same [model]
    from medsyngan.config import load_config

    preset = load_config("public-covid64")
    assert preset.data.source == "covid-cxr" and preset.model == load_config("federated-dcgan64").model


def test_every_row_says_what_its_choices_were_made_on(eps, exp):
    for folder in (eps, exp):
        for row in folder.study.rows:
            chosen = folder.book[row].chosen_on
            assert chosen and all(text.strip() for text in chosen.values()), row


def test_a_sweep_needs_one_epsilon_per_row(tmp_path):
    import shutil

    from medsyngan.errors import UserError
    from medsyngan.workflows.experiment import load_experiment

    shutil.copytree(EPS, tmp_path / "eps")
    study_toml = tmp_path / "eps" / "study.toml"
    study_toml.write_text(study_toml.read_text().replace("epsilons = [0.5, 1.0,", "epsilons = [1.0,"))
    with pytest.raises(UserError, match="sweep.epsilons has 5 values for 6 rows"):
        load_experiment(tmp_path / "eps")


def _scored(name: str, epsilon: float | None, synth: float) -> dict:
    metrics = {"fd500_64_random": 3.0 / synth, "c2st_auroc500_64": 1.2 - synth / 2, "c2st_auroc500_64_lo": 0.5,
               "c2st_auroc500_64_hi": 1.0, "reid_synth_rate_fmr1e-3": 0.01, "reid_holdout_rate_fmr1e-3": 0.02}
    for kind, tag, value in (("synth", "synth500_64", synth), ("real", "real554_64", 0.8),
                             ("dp", "dp554_64_eps1", 0.6), ("fidelity", "fidelity500_64", 0.45)):
        for key in (f"auroc_{tag}_mean", f"auroc_{tag}_view_pa"):
            metrics |= {key: value, f"{key}_lo": value - 0.1, f"{key}_hi": value + 0.05}
    metrics["auroc_gap_dp_synth500_64_eps1_mean"] = synth - 0.6
    return {"config": name, "label": f"row {name}", "seed": 0, "epsilon": epsilon, "metrics": metrics}


def test_the_utility_table_and_the_sweep_plot(eps, tmp_path):
    from study_utility import per_label_markdown, sweep_png, utility_markdown

    rows = eps.study.sweep.rows
    results = [_scored(row, e if np.isfinite(e) else None, 0.55 + 0.05 * n)
               for n, (row, e) in enumerate(zip(rows, eps.study.sweep.epsilons))]
    table = utility_markdown(results, rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert table[3].startswith("| row eps-1 | 1 | 0.600 [0.500, 0.650] | 0.800 [0.700, 0.850] | 0.600")
    assert "| — |" not in table[3]  # every figure of the row found
    assert per_label_markdown(results[0]).splitlines()[2] == \
        "| view_pa | 0.550 [0.450, 0.600] | 0.800 [0.700, 0.850] | 0.600 [0.500, 0.650] | 0.450 [0.350, 0.500] |"
    png = sweep_png(results, rows, eps.study.sweep.epsilons, tmp_path / "eps-sweep.png", "test")
    from PIL import Image

    with Image.open(png) as image:
        assert image.size[0] > 800


@needs_nih
@pytest.mark.slow
def test_quick_eps_sweep_end_to_end(eps, tmp_path):
    study = _study()
    report = study.run_study(quick=True, seeds=[0], out=tmp_path / "eps", docs=tmp_path / "docs", experiment=EPS)
    runs = {r["config"]: r for r in report["runs"]}
    assert list(runs) == eps.study.quick_rows
    for name, run in runs.items():
        m = run["metrics"]
        assert np.isfinite(study.pick(m, "fd")) and 0 <= study.pick(m, "c2st_auroc") <= 1, name
        synth = study.pick(m, "auroc_synth", "_mean")
        assert synth is not None and 0 <= synth <= 1, name
        assert study.pick(m, "auroc_dp", "_mean") is not None and study.pick(m, "auroc_real", "_mean") is not None
    assert 0 < runs["eps-1"]["epsilon"] <= 1.0 + 1e-6 and runs["eps-inf"]["epsilon"] is None
    from medsyngan.config import load_config

    public = load_config(tmp_path / "eps" / "runs" / "public-s0" / "config.toml")
    assert public.data.source == "phantoms"
    assert (tmp_path / "docs" / "results" / "eps-sweep.json").is_file()
    assert (tmp_path / "docs" / "results" / "eps-sweep.png").is_file() and (tmp_path / "eps" / "eps-sweep.png").is_file()
    text = (tmp_path / "eps" / "study.md").read_text()
    assert "synthetic-only AUROC" in text and "Per label" in text
