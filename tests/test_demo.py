"""`medsyngan demo --quick` end to end: the public phantom model, federation from it with DP, secure aggregation
and encryption, its centralized twin, evaluation of all three, the summary and one report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_quick_demo_writes_summary_and_report(tmp_path, medsyngan_cache):
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
    assert summary["centralized"]["steps"] >= 1 and summary["public"]["steps"] >= 1
    # The public model saw freshly drawn phantoms, never a hospital's patient; both runs started from it.
    from medsyngan.config import load_config

    public = load_config(out / "public" / "config.toml")
    assert public.data.source == "phantoms" and public.data.split == "all" and not public.privacy.dp
    for run in ("federated", "centralized"):
        assert load_config(out / run / "config.toml").train.init_from == str(out / "public")
    from medsyngan.demo import FINE_TUNING

    for run in ("federated", "centralized"):  # the twin differs only by federation and privacy
        train = load_config(out / run / "config.toml").train
        assert all(getattr(train, key) == value for key, value in FINE_TUNING.items())
    assert public.train.d_trainable_last == 0

    report = (out / "report.html").read_text()
    assert "<table id='comparison'>" in report and "data:image/png;base64," in report
    assert (out / "federated" / "checkpoints" / "latest").is_file()
    assert (out / "centralized" / "checkpoints" / "latest").is_file()


@pytest.mark.parametrize("quick", [False, True])
def test_fine_tuning_spends_the_planned_private_steps_in_groups_of_d_steps(tmp_path, quick):
    from medsyngan.demo import FINE_TUNING, demo_config, fine_tuning_config
    from medsyngan.privacy.accounting import planned_private_steps

    cfg = demo_config(quick, None, [])
    tuned = fine_tuning_config(cfg, tmp_path)
    assert tuned.train.d_steps_per_g == FINE_TUNING["d_steps_per_g"] > cfg.train.d_steps_per_g
    # Fewer G steps, the same private D steps: the privacy plan (and so the noise) is the one cfg asked for.
    assert tuned.federated.local_steps < cfg.federated.local_steps
    assert planned_private_steps(tuned) == planned_private_steps(cfg)
    assert tuned.train.init_from == str(tmp_path)
