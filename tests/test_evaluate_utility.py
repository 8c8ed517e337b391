"""`medsyngan evaluate --utility`: a conditional run's labelled films scored by train-synthetic-test-real utility,
detectability and re-identification, in metrics.json and a report section; one-line errors where it cannot apply."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_run import run_cli
from medsyngan.config import load_config
from medsyngan.rundir import RunDir

RUN = ["run.device=cpu", "run.seed=3", "model.ngf=8", "model.ndf=8", "model.z_dim=16", "model.resolution=32",
       "data.size=32", 'data.source="prepared"', 'model.condition=["findings", "view", "sex"]', "train.batch_size=8",
       "train.steps=2", "train.ema_kimg=0.05", "eval.num_samples=48"]


@pytest.fixture(scope="module")
def conditional(tmp_path_factory, medsyngan_cache):
    """A tiny conditional run on the training patients of a phantom set, and the held-out patients' set (100
    films: enough pairs of different patients to calibrate re-identification at a false-match rate of 1e-3)."""
    from medsyngan.data.api import phantom_dataset
    from medsyngan.workflows import train
    from medsyngan.workflows.split import split_patients

    work = tmp_path_factory.mktemp("utility")
    split_patients(phantom_dataset(100, 2, 32, seed=5), 0.5, 0, work / "train", work / "eval", ("train", "eval"))
    cfg = load_config("dcgan64", [*RUN, f'data.path="{work / "train"}"'])
    train(cfg, RunDir(work / "run").create(cfg))
    return work


def test_evaluate_utility_scores_a_conditional_run_and_reports_it(conditional, monkeypatch, capsys):
    from medsyngan.data.shared import covid_cxr_dir

    out = conditional / "scored"
    code, stdout, err = run_cli(monkeypatch, capsys, "evaluate", "--run", str(conditional / "run"),
                                "--real", str(conditional / "eval"), "--train", str(conditional / "train"),
                                "--out", str(out), "--metrics", "fd", "--utility", "--snapshot-count", "0")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    synth = [k for k in metrics if k.startswith("auroc_synth48_32_") and k.endswith("_mean")]
    real = [k for k in metrics if k.startswith("auroc_real") and k.endswith("_mean") and "rare" not in k]
    dp = [k for k in metrics if k.startswith("auroc_dp") and k.endswith("_mean")]
    assert synth and real and dp, sorted(metrics)
    for key in (*synth, *real, *dp):
        assert 0 <= metrics[f"{key}_lo"] <= metrics[key] <= metrics[f"{key}_hi"] <= 1
    assert "auroc_synth48_32_view_pa" in metrics  # view is one of the labels the phantoms carry
    assert any(k.startswith("c2st_auroc") for k in metrics)
    report = (out / "report.html").read_text()
    assert "Does the synthetic data help?" in report and "id='utility'" in report and "Detectability" in report
    if (covid_cxr_dir() / "labels.csv").is_file():  # the verifier trains on the public COVID-19 films
        assert "reid_synth_rate_fmr1e-3" in metrics and "Re-identification" in report
        assert 0 <= metrics["reid_synth_rate_fmr1e-3"] <= 1


def test_utility_labels_are_those_the_films_were_generated_from(conditional):
    from medsyngan.training.generate import generate_images, label_layout, load_generator
    from medsyngan.workflows.evaluation import generated_labels, latent_seed

    G, _ = load_generator(conditional / "run")
    labels, names, matrix = generated_labels(G, 48, latent_seed(3))
    # the films evaluate_run scores are the ones generate draws for the same seed without labels
    assert np.array_equal(generate_images(G, 48, latent_seed(3), labels=labels), generate_images(G, 48, latent_seed(3)))
    layout = label_layout(G)
    views = [layout.decode(v)["view"] for v in labels.numpy()]
    assert list(matrix[:, names.index("view_pa")]) == [1.0 if v == "PA" else 0.0 for v in views]


@pytest.mark.parametrize("args, message", [
    (["--fake", "{eval}"], "--utility scores the labelled films of a conditional run; give --run"),
    (["--run", "{run}", "--real", "{real_folder}"], "needs the labels of the --real films"),
])
def test_utility_where_it_cannot_apply_is_a_one_line_error(conditional, monkeypatch, capsys, tmp_path, args, message):
    from PIL import Image

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(folder / f"{i}.png")
    fill = {"eval": str(conditional / "eval"), "run": str(conditional / "run"), "real_folder": str(folder)}
    args = [a.format(**fill) for a in args]
    if "--real" not in args:
        args += ["--real", str(conditional / "eval")]
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", *args, "--out", str(tmp_path / "o"), "--utility")
    assert code != 0 and message in err and "Traceback" not in err


def test_utility_of_an_unconditional_run_names_the_setting(tmp_path, medsyngan_cache, conditional):
    from medsyngan.errors import UserError
    from medsyngan.workflows import train
    from medsyngan.workflows.evaluation import evaluate_run

    cfg = load_config("dcgan64", [*RUN, f'data.path="{conditional / "train"}"', "model.condition=[]"])
    run_dir = RunDir(tmp_path / "plain").create(cfg)
    train(cfg, run_dir)
    from medsyngan.data.prepared import PreparedDataset

    with pytest.raises(UserError, match=r"class-conditional model \(train with model.condition"):
        evaluate_run(run_dir.root, PreparedDataset.open(conditional / "eval"), utility=True, metrics="fd")
