"""`medsyngan privacy`: figures for a setting, σ for a target, a configuration's plan, one-line errors."""

import pytest
from cli_run import run_cli


def _run(monkeypatch, capsys, *args):
    return run_cli(monkeypatch, capsys, "privacy", *args)


def test_epsilon_for_a_noise_multiplier_names_both_relations(monkeypatch, capsys):
    from medsyngan.privacy.accounting import epsilon_of

    code, out, _ = _run(monkeypatch, capsys, "--noise-multiplier", "1.5", "--sample-rate", "0.04",
                        "--steps", "2250", "--delta", "1e-5")
    assert code == 0
    assert "replace-one (reported" in out and "add/remove-one (Opacus RDP)" in out and "7.3291" in out
    assert f"{epsilon_of([(1.5, 0.04, 2250)], 1e-5):.4f}" in out


def test_noise_multiplier_for_a_target(monkeypatch, capsys):
    from medsyngan.privacy.accounting import calibrate_noise

    code, out, _ = _run(monkeypatch, capsys, "--target-epsilon", "2", "--sample-rate", "0.05", "--steps", "300")
    assert code == 0
    assert f"{calibrate_noise(2.0, 1e-5, 0.05, 300):.4f}" in out and "(replace-one)" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--noise-multiplier", "1", "--sample-rate", "1.5", "--steps", "10"], "sampling rate 1.5"),
        (["--target-epsilon", "0.0001", "--sample-rate", "1", "--steps", "1000"], "cannot be met"),
        (["--noise-multiplier", "1", "--target-epsilon", "1", "--sample-rate", "0.1", "--steps", "5"], "exactly one"),
        (["--noise-multiplier", "1", "--steps", "5"], "--sample-rate"),
        (["--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "5", "--delta", "2"], "δ"),
    ],
)
def test_bad_input_is_one_line(monkeypatch, capsys, args, message):
    code, out, err = _run(monkeypatch, capsys, *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_keygen(monkeypatch, capsys, tmp_path):
    path = tmp_path / "ckpt.key"
    assert _run(monkeypatch, capsys, "keygen", str(path))[0] == 0
    assert path.stat().st_size == 32
    code, _, err = _run(monkeypatch, capsys, "keygen", str(path))
    assert code == 2 and "refusing to overwrite" in err


def test_config_plan_per_training_set(monkeypatch, capsys, medsyngan_cache):
    from medsyngan.privacy.accounting import calibrate_noise

    overrides = ["data.phantom_patients=20", "data.phantom_images_per_patient=2", "train.batch_size=4",
                 "train.steps=50", "privacy.dp=true"]
    args = ["--config", "dcgan64"] + [a for o in overrides for a in ("--set", o)]
    code, out, err = _run(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "patient" in out and "0.2" in out  # 4 of 20 patients per step
    assert f"{calibrate_noise(1.0, 1e-5, 0.2, 50):.4f}" in out
    assert "centralized: ε = 1.00 (replace-one patient); add/remove-one" in out
    code, _, err = _run(monkeypatch, capsys, *args[:-2], "--set", "train.batch_size=64")
    assert code == 2 and "set train.batch_size ≤ 20" in err


def test_config_plan_per_hospital(monkeypatch, capsys, medsyngan_cache):
    from medsyngan.privacy.accounting import calibrate_noise

    # 20 phantom patients split over 2 hospitals: 10 each, of which split_holdout keeps 1 out of training.
    overrides = ["data.phantom_patients=20", "data.phantom_images_per_patient=2", "train.batch_size=3",
                 "federated.hospitals=2", "federated.rounds=2", "federated.local_steps=5", "privacy.client_dp=true",
                 "privacy.target_epsilon=3"]  # the hospitals' policy (hospital.max_epsilon = 1) caps it
    code, out, err = _run(monkeypatch, capsys, "--config", "federated-dcgan64",
                          *[a for o in overrides for a in ("--set", o)])
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("│ hospital ")]
    assert len(rows) == 2
    sigma = f"{calibrate_noise(1.0, 1e-5, 3 / 9, 10):.4f}"
    assert all(" 9 " in row and "0.3333" in row and sigma in row for row in rows), out
    assert "hospital 0: ε = 1.00 (replace-one patient)" in out and "hospital 1: ε = 1.00 (replace-one" in out
    assert "client-level DP-FedAvg (unit = hospital, q = 1" in out


def test_config_plan_pays_for_the_mean_image_release(monkeypatch, capsys, medsyngan_cache):
    from medsyngan.privacy.accounting import calibrate_noise

    overrides = ["data.phantom_patients=20", "data.phantom_images_per_patient=2", "train.batch_size=4",
                 "train.steps=50", "privacy.dp=true", "privacy.target_epsilon=10", "privacy.mean_image_size=4",
                 "privacy.mean_image_noise=4"]
    args = ["--config", "dcgan64"] + [a for o in overrides for a in ("--set", o)]
    code, out, err = _run(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "4×4 mean-image release (Gaussian, σ = 4)" in out
    assert f"{calibrate_noise(10.0, 1e-5, 0.2, 50, prior=[(4.0, 1.0, 1)]):.4f}" in out
    code, _, err = _run(monkeypatch, capsys, *args, "--set", "privacy.mean_image_noise=0.5")
    assert code == 2 and "releases (mean image, label frequencies) alone spend ε" in err
    assert "raise privacy.mean_image_noise" in err
