"""The accountant wrapper: Opacus' golden value, a history that survives checkpoints, calibration, validation."""

import json
import math

import pytest

from medsyngan.errors import UserError
from medsyngan.privacy.accounting import (
    BudgetExceeded,
    PrivacyAccountant,
    calibrate_noise,
    client_level_accountant,
    default_delta,
    epsilon_of,
    plan_dp,
)


def test_opacus_golden_value_through_wrapper():
    # Opacus' README/test figure for RDP: σ = 1.5, q = 0.04, 2250 steps, δ = 1e-5 → ε ≈ 7.3291.
    acc = PrivacyAccountant(0.04, 1.5, 1e-5)
    acc.step(2000)
    acc.step(250)
    eps = acc.epsilon()
    assert eps["rdp"] == pytest.approx(7.3291, abs=1e-3)
    # PRV is tight, so it lies below the RDP bound here, and the reported figure is the larger.
    assert 6.0 < eps["prv"] < eps["rdp"]
    assert eps["reported"] == max(eps["rdp"], eps["prv"])


def test_state_round_trip_is_json_and_continues_the_history():
    acc = PrivacyAccountant(0.05, 1.1, 1e-5, unit="patient", units=1000)
    acc.step(100)
    acc.set_mechanism(noise_multiplier=1.3)
    acc.step(50)
    state = json.loads(json.dumps(acc.state_dict()))
    resumed = PrivacyAccountant.from_state_dict(state)
    assert resumed.steps == 150 and resumed.history == acc.history
    assert resumed.epsilon() == acc.epsilon()
    resumed.step(10)
    uninterrupted = PrivacyAccountant.from_state_dict(acc.state_dict())
    uninterrupted.step(10)
    assert resumed.epsilon()["rdp"] == pytest.approx(uninterrupted.epsilon()["rdp"], rel=1e-12)
    assert resumed.epsilon()["rdp"] > acc.epsilon()["rdp"]


def test_loading_an_older_state_is_refused():
    acc = PrivacyAccountant(0.05, 1.1, 1e-5)
    acc.step(10)
    old = acc.state_dict()
    acc.step(5)
    with pytest.raises(UserError, match="newest checkpoint"):
        acc.load_state_dict(old)


def test_history_equals_a_single_run_of_steps():
    a = PrivacyAccountant(0.02, 1.0, 1e-5)
    for _ in range(30):
        a.step()
    assert a.history == [(1.0, 0.02, 30)]
    assert a.epsilon()["rdp"] == pytest.approx(epsilon_of([(1.0, 0.02, 30)], 1e-5, "rdp"))


def test_zero_steps_and_zero_noise():
    assert PrivacyAccountant(0.1, 1.0, 1e-5).epsilon() == {"rdp": 0.0, "prv": 0.0, "reported": 0.0}
    acc = PrivacyAccountant(0.1, 0.0, 1e-5)
    acc.step()
    assert math.isinf(acc.epsilon()["reported"])


def test_calibration_meets_target_without_overshoot():
    sigma = calibrate_noise(1.0, 1e-5, 0.05, 500)
    eps = epsilon_of([(sigma, 0.05, 500)], 1e-5, "rdp")
    assert 0.98 <= eps <= 1.0
    assert epsilon_of([(sigma, 0.05, 500)], 1e-5, "prv") <= 1.0
    # The PRV-only calibration needs less noise, as PRV is the tighter analysis.
    assert calibrate_noise(1.0, 1e-5, 0.05, 500, accountant="prv") < sigma


def test_calibration_pays_for_a_prior_release_from_the_same_budget():
    release = [(2.0, 1.0, 1)]  # one Gaussian release at q = 1, e.g. the mean image
    alone = calibrate_noise(10.0, 1e-5, 0.5, 200)
    sigma = calibrate_noise(10.0, 1e-5, 0.5, 200, prior=release)
    assert sigma > alone
    worst = max(epsilon_of(release + [(sigma, 0.5, 200)], 1e-5, m) for m in ("rdp", "prv"))
    assert 9.9 <= worst <= 10.0
    assert max(epsilon_of(release + [(sigma / 1.01, 0.5, 200)], 1e-5, m) for m in ("rdp", "prv")) > 10.0
    # The plan's accountant carries the release from the start.
    plan = plan_dp(60, 30, 200, 10.0, release_noise=2.0)
    assert plan.noise_multiplier == pytest.approx(sigma) and plan.accountant().history == release
    with pytest.raises(UserError, match="releases .* alone spend ε = .* raise privacy.mean_image_noise"):
        calibrate_noise(1.0, 1e-5, 0.5, 200, prior=release)


def test_unmeetable_target_is_a_user_error():
    # RDP with Opacus' orders cannot certify ε below ~0.1 at δ = 1e-5, whatever the noise.
    with pytest.raises(UserError, match="cannot be met"):
        calibrate_noise(0.05, 1e-5, 0.01, 100, accountant="rdp")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sample_rate=1.5, noise_multiplier=1.0, delta=1e-5), "sampling rate"),
        (dict(sample_rate=0.1, noise_multiplier=1.0, delta=1e-3, units=1000), "not below 1 / privacy units"),
        (dict(sample_rate=0.1, noise_multiplier=-1.0, delta=1e-5), "negative"),
        (dict(sample_rate=0.1, noise_multiplier=1.0, delta=0.0), "δ"),
    ],
)
def test_bad_parameters_are_one_line_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match) as info:
        PrivacyAccountant(**kwargs)
    assert "\n" not in str(info.value)


def test_default_delta():
    assert default_delta(40) == 1e-5
    assert default_delta(50_000) == 1e-5
    assert default_delta(1_000_000) == 1 / 2_000_000
    with pytest.raises(UserError):
        default_delta(0)


def test_budget_check_refuses_to_overspend():
    sigma = calibrate_noise(1.0, 1e-5, 0.05, 200, accountant="max")
    acc = PrivacyAccountant(0.05, sigma, 1e-5)
    acc.check_budget(1.0, 200)
    acc.step(200)
    assert acc.epsilon()["reported"] <= 1.0
    with pytest.raises(BudgetExceeded, match="training stops"):
        acc.check_budget(1.0, 20)
    assert acc.steps == 200


def test_client_level_accounting_counts_rounds_of_hospitals():
    acc = client_level_accountant(fraction=1.0, noise_multiplier=1.0, hospitals=3)
    acc.step(10)
    assert acc.unit == "hospital" and acc.delta == 1e-5
    # Without sampling, 10 Gaussian mechanisms with σ = 1 compose to one with σ = 1/sqrt(10): RDP at order α is
    # 10·α/(2σ²), a closed form independent of Opacus' subsampling code.
    alphas = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    expected = min(10 * a / 2 - (math.log(1e-5) + math.log(a)) / (a - 1) + math.log((a - 1) / a) for a in alphas)
    assert acc.epsilon()["rdp"] == pytest.approx(expected, rel=1e-9)
