"""evaluate_run, the one way a trained run is scored: its seed rule, what it writes, and an evaluation that computed
nothing is a one-line error that writes nothing (library and CLI)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from medsyngan.config import load_config
from medsyngan.errors import UserError
from medsyngan.rundir import RunDir

RUN = ["run.device=cpu", "run.seed=4", "model.ngf=8", "model.ndf=8", "model.z_dim=16", "model.resolution=32",
       "data.size=32", "data.phantom_patients=16", "data.phantom_images_per_patient=2", "train.batch_size=8",
       "train.steps=2", "train.ema_kimg=0.05", "eval.num_samples=24", 'eval.metrics="fd,nn,privacy"']


@pytest.fixture(scope="module")
def trained(tmp_path_factory, medsyngan_cache):
    """A tiny centralized run, with ε and δ in its log as a private run has them."""
    from medsyngan.data.api import phantom_dataset
    from medsyngan.workflows import train

    cfg = load_config("dcgan64", RUN)
    run_dir = RunDir(tmp_path_factory.mktemp("run")).create(cfg)
    train(cfg, run_dir)
    run_dir.append_metrics({"round": 1, "epsilon": 0.7, "delta": 1e-5})
    return run_dir.root, phantom_dataset(10, 2, 32, seed=99)


def test_a_run_is_scored_from_latents_of_its_seed_plus_1000_and_metrics_json_is_written(trained):
    from medsyngan.training.generate import generate_images, load_generator
    from medsyngan.workflows.evaluation import evaluate_run, latent_seed

    root, real = trained
    scored = evaluate_run(root, real)
    assert latent_seed(4) == 1004 and scored.seed == 4
    G, meta = load_generator(root)
    assert meta["generator_part"] == "G_ema" and scored.meta["generator_part"] == "G_ema"
    assert np.array_equal(scored.images, generate_images(G, 24, 1004))  # eval.num_samples of the run
    assert not np.array_equal(scored.images, generate_images(G, 24, 4))  # never the training latents' seed
    assert (scored.epsilon, scored.delta) == (0.7, 1e-5)
    assert set(scored.evaluation.not_applicable) == {"nn", "privacy"}  # no training set given
    assert json.loads((root / "metrics.json").read_text()) == scored.metrics and "fd24_32_random" in scored.metrics
    again = evaluate_run(root, real, seed=9, num_samples=12, metrics="fd,kid", out=root / "other")
    assert np.array_equal(again.images, generate_images(G, 12, 1009)) and any(k.startswith("kid") for k in again.metrics)
    assert json.loads((root / "other" / "metrics.json").read_text()) == again.metrics


def test_a_run_where_no_metric_could_be_computed_writes_nothing(trained, tmp_path):
    from medsyngan.workflows.evaluation import evaluate_run

    root, real = trained
    with pytest.raises(UserError, match=r"no metric could be computed: nn \(needs the training images"):
        evaluate_run(root, real, metrics="nn", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_to_write_an_empty_evaluation(tmp_path, medsyngan_cache):
    from PIL import Image

    for name, count in (("one", 1), ("real", 6)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(tmp_path / name / f"{i}.png")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "medsyngan.cli", "evaluate", "--fake", str(tmp_path / "one"),
                           "--real", str(tmp_path / "real"), "--metrics", "kid", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "no metric could be computed: kid (KID needs at least 2 images" in errors[0]
    assert not (out / "metrics.json").exists() and not (out / "report.html").exists()


def test_hospital_table_sums_each_hospitals_rounds(tmp_path):
    from medsyngan.workflows.evaluation import hospital_table, images_seen

    run_dir = RunDir(tmp_path)
    for r, eps in ((1, 0.4), (2, 0.8)):
        run_dir.append_metrics({"round": r, "kimg": 0.5 * r, "hospital": {
            "0": {"train_images": 10, "epsilon": eps, "epsilon_add_remove": eps / 2, "patient_level": 1.0,
                  "relation": "replace-one", "delta": 1e-5, "bytes_received_from": 100},
            "1": {"train_images": 12, "bytes_received_from": 50}}})
    assert hospital_table(run_dir) == [
        {"hospital": 0, "images": 10, "epsilon": 0.8, "epsilon_add_remove": 0.4, "unit": "patient", "bytes_sent": 200,
         "rounds": 2, "relation": "replace-one", "delta": 1e-5},
        {"hospital": 1, "images": 12, "epsilon": None, "bytes_sent": 100, "rounds": 2}]
    assert images_seen(run_dir) == 1000
