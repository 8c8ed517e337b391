"""`medsyngan demo`: its runs as recipes (public phantom model, federated fine-tuning from it with DP, secure
aggregation and encryption, the centralized twin), the quick demo end to end, and a summary table that keeps metric
names whole at 80 columns."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def recipes():
    from medsyngan.workflows.demo import demo_recipes

    return demo_recipes()


class _Trained:
    """A run folder as run_config reads it: its root, and the images through D its log reports."""

    def __init__(self, root: Path, kimg: float = 0.0):
        from medsyngan.rundir import RunDir

        self.run_dir = RunDir(root)
        if kimg:
            root.mkdir(parents=True, exist_ok=True)
            self.run_dir.append_metrics({"round": 1, "kimg": kimg})


@pytest.mark.slow
def test_quick_demo_writes_summary_and_report(tmp_path, medsyngan_cache, recipes):
    out = tmp_path / "demo"
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "COLUMNS": "160"}
    proc = subprocess.run([sys.executable, "-m", "medsyngan.cli", "demo", "--quick", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    text = proc.stdout + proc.stderr
    assert "what federation and privacy cost" in text and "report.html" in text

    summary = json.loads((out / "summary.json").read_text())
    hospitals = summary["hospitals"]
    assert len(hospitals) == 3
    for h in hospitals:
        assert h["images"] > 0 and h["bytes_sent"] > 0
        assert 0 < h["epsilon"] <= 1.0  # the accountant's figure never exceeds the target
    for run in ("federated", "centralized", "public"):
        metrics = summary[run]["metrics"]
        assert any(k.startswith("fd") for k in metrics), metrics
        assert "ssim_nn_train" in metrics
        assert json.loads((out / run / "metrics.json").read_text()) == metrics  # scored by evaluate_run
    assert summary["centralized"]["steps"] >= 1 and summary["public"]["steps"] >= 1
    # The public model saw freshly drawn phantoms, never a hospital's patient; both runs started from it.
    from medsyngan.config import load_config

    public = load_config(out / "public" / "config.toml")
    federated = load_config(out / "federated" / "config.toml")
    assert public.data.source == "phantoms" and public.data.split == "all" and not public.privacy.dp
    assert public.data.seed == federated.data.seed + 1_000_003 and public.train.d_trainable_last == 0
    fine_tuning = recipes.book["federated"].overrides["train"]
    for run in ("federated", "centralized"):  # the twin differs only by federation and privacy
        train = load_config(out / run / "config.toml").train
        assert train.init_from == str(out / "public")
        assert all(getattr(train, key) == value for key, value in fine_tuning.items())
    # The twin trained for the images through D the federation measured.
    twin = load_config(out / "centralized" / "config.toml").train
    assert twin.steps == round(summary["images_through_d"] / twin.batch_size / twin.d_steps_per_g)

    report = (out / "report.html").read_text()
    assert "<table id='comparison'>" in report and "data:image/png;base64," in report
    assert (out / "federated" / "checkpoints" / "latest").is_file()
    assert (out / "centralized" / "checkpoints" / "latest").is_file()


@pytest.mark.parametrize("quick", [False, True])
def test_fine_tuning_spends_the_planned_private_steps_in_groups_of_d_steps(tmp_path, quick, recipes):
    from medsyngan.privacy.accounting import planned_private_steps
    from medsyngan.workflows.demo import demo_config, demo_settings, run_config

    settings = demo_settings(recipes, quick, None, [])
    base = demo_config(recipes, settings)
    tuned = run_config(recipes, "federated", settings, base, {"public": _Trained(tmp_path)})
    assert tuned.train.d_steps_per_g == 5 > base.train.d_steps_per_g
    # Fewer G steps, the same private D steps: the privacy plan (and so the noise) is the one the preset asked for.
    assert tuned.federated.local_steps < base.federated.local_steps
    assert tuned.federated.rounds == base.federated.rounds
    assert planned_private_steps(tuned) == planned_private_steps(base)
    assert tuned.train.init_from == str(tmp_path) and tuned.run.name == base.run.name


def test_the_public_model_and_the_twin_train_for_the_federations_images(tmp_path, recipes):
    from medsyngan.workflows.demo import demo_config, demo_settings, run_config
    from medsyngan.workflows.recipes import planned_images

    settings = demo_settings(recipes, True, None, ["run.seed=3"])
    base = demo_config(recipes, settings)
    public = run_config(recipes, "public", settings, base, {})
    assert planned_images(public) == planned_images(base) and not public.federated.enabled
    assert (public.run.seed, public.data.seed) == (3 + 1_000_003, base.data.seed + 1_000_003)
    assert public.run.name == f"{base.run.name}-public" and public.data.source == "phantoms"
    runs = {"public": _Trained(tmp_path / "public"), "federated": _Trained(tmp_path / "federated", kimg=0.343)}
    twin = run_config(recipes, "centralized", settings, base, runs)
    assert twin.train.steps == round(343 / (twin.train.batch_size * twin.train.d_steps_per_g))
    assert not twin.federated.enabled and not twin.privacy.dp and twin.train.init_from == str(tmp_path / "public")
    assert twin.train.sample_every == max(1, twin.train.steps // 4)
    from medsyngan.errors import UserError

    with pytest.raises(UserError, match="needs the run of 'federated'"):
        run_config(recipes, "centralized", settings, base, {"public": runs["public"]})


def test_the_summary_keeps_metric_names_whole_at_80_columns(tmp_path):
    from rich.console import Console

    from medsyngan.config import load_config
    from medsyngan.rundir import RunDir
    from medsyngan.workflows.demo import RunOutcome, print_summary

    metrics = {"fd200_64_random": 2.5, "kid200_64_random": 0.01, "precision200_64_random_k3": 0.8,
               "recall200_64_random_k3": 0.3, "coverage200_64_random_k5": 0.9, "msssim_div_fake": 0.6,
               "ssim_nn_train_max": 0.7, "mia_ganleaks_pixel_tpr_fpr1e-3": 0.002, "mia_bound_tpr_fpr1e-3": 0.01}
    runs = [RunOutcome(name, label, RunDir(tmp_path / name), load_config("demo"), 12.0, dict(metrics))
            for name, label in (("federated", "federated"), ("centralized", "centralized, no privacy"),
                                ("public", "public phantoms only"))]
    hospitals = [{"hospital": 0, "images": 90, "rounds": 3, "epsilon": 0.99, "epsilon_add_remove": 0.55,
                  "unit": "patient", "bytes_sent": 2_500_000}]
    buffer = io.StringIO()
    print_summary(runs, hospitals, 60.0, tmp_path / "report.html", Console(file=buffer, width=80))
    text = buffer.getvalue()
    assert max(map(len, text.splitlines())) <= 80
    for name in metrics:
        assert name in text, name
    assert "0.990 (0.550)" in text and "replace-one patient (add/remove-one)" in " ".join(text.split())
