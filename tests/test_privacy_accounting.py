"""The accountant: replace-one ε (dp-accounting PLD) and its convention, the add/remove figure beside it (Opacus'
golden value), a history that survives JSON, calibration, validation, and the under-counts it replaces."""

import json
import math

import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from medsyngan.errors import UserError
from medsyngan.privacy.accounting import (
    BudgetExceeded,
    PrivacyAccountant,
    calibrate_noise,
    client_level_accountant,
    default_delta,
    describe,
    epsilon_of,
    epsilons,
    plan_dp,
)


def analytic_gaussian_epsilon(sensitivity: float, std: float, delta: float) -> float:
    """ε of the Gaussian mechanism, exactly (Balle & Wang 2018, Theorem 8): the smallest ε with
    Φ(Δ/2s − εs/Δ) − e^ε Φ(−Δ/2s − εs/Δ) ≤ δ."""
    def excess(eps: float) -> float:
        a, b = sensitivity / (2 * std), eps * std / sensitivity
        return norm.cdf(a - b) - math.exp(eps) * norm.cdf(-a - b) - delta

    return brentq(excess, 0.0, 500.0, xtol=1e-12)


@pytest.mark.parametrize("sigma", [0.7, 2.0, 6.0])
def test_replace_one_is_the_gaussian_mechanism_at_twice_the_clip(sigma):
    """The convention the reported ε rests on: at q = 1, a sum of vectors clipped to C plus N(0, σ²C²) changes by up
    to 2C when one vector is replaced, so its replace-one ε must be the analytic Gaussian mechanism's at
    sensitivity 2C (and its add/remove ε the one at sensitivity C)."""
    delta = 1e-5
    replace = epsilon_of([(sigma, 1.0, 1)], delta)
    assert replace == pytest.approx(analytic_gaussian_epsilon(2.0, sigma, delta), rel=2e-3)
    assert replace >= analytic_gaussian_epsilon(2.0, sigma, delta)  # pessimistic: an upper bound
    assert replace > 1.5 * analytic_gaussian_epsilon(1.0, sigma, delta)
    # Ten releases at σ compose to one at σ/√10 (q = 1): the composition is exact too.
    assert epsilon_of([(sigma, 1.0, 10)], delta) == pytest.approx(
        analytic_gaussian_epsilon(2.0, sigma / math.sqrt(10), delta), rel=2e-3)


def test_opacus_golden_value_is_the_add_remove_figure_and_replace_one_lies_above_it():
    # Opacus' README/test figure for RDP: σ = 1.5, q = 0.04, 2250 steps, δ = 1e-5 → ε ≈ 7.3291.
    acc = PrivacyAccountant(0.04, 1.5, 1e-5)
    acc.step(2000)
    acc.step(250)
    eps = acc.epsilon()
    assert eps["rdp"] == pytest.approx(7.3291, abs=1e-3)
    assert 6.0 < eps["prv"] < eps["rdp"] == eps["add_remove"]
    assert eps["reported"] == eps["replace_one"] > eps["add_remove"]
    assert describe(eps, "patient") == f"ε = {eps['reported']:.2f} (replace-one patient); add/remove-one 7.33"


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
    assert resumed.epsilon() == uninterrupted.epsilon()
    assert resumed.epsilon()["reported"] > acc.epsilon()["reported"]


def test_loading_an_older_state_is_refused():
    acc = PrivacyAccountant(0.05, 1.1, 1e-5)
    acc.step(10)
    old = acc.state_dict()
    acc.step(5)
    with pytest.raises(UserError, match="newest checkpoint"):
        acc.load_state_dict(old)


def test_history_equals_a_single_run_of_steps_and_a_refund_takes_back_only_steps():
    a = PrivacyAccountant(0.02, 1.0, 1e-5)
    for _ in range(30):
        a.step()
    assert a.history == [(1.0, 0.02, 30)]
    a.refund(4)
    assert a.history == [(1.0, 0.02, 26)]
    a.record(2.0, 1.0)  # a release made while the steps were reserved stays charged
    a.refund(6)
    assert a.history == [(1.0, 0.02, 20), (2.0, 1.0, 1)]
    with pytest.raises(ValueError, match="cannot refund"):
        a.refund(21)


def test_zero_steps_and_zero_noise():
    zero = PrivacyAccountant(0.1, 1.0, 1e-5).epsilon()
    assert set(zero) == {"replace_one", "rdp", "prv", "add_remove", "reported"} and not any(zero.values())
    acc = PrivacyAccountant(0.1, 0.0, 1e-5)
    acc.step()
    assert math.isinf(acc.epsilon()["reported"]) and math.isinf(acc.epsilon()["add_remove"])


def test_calibration_meets_the_replace_one_target_without_overshoot():
    sigma = calibrate_noise(1.0, 1e-5, 0.05, 500)
    assert 0.98 <= epsilon_of([(sigma, 0.05, 500)], 1e-5) <= 1.0
    assert epsilon_of([(sigma / 1.01, 0.05, 500)], 1e-5) > 1.0
    # Calibrated for replace-one, the add/remove figure beside it is smaller.
    assert max(epsilon_of([(sigma, 0.05, 500)], 1e-5, m) for m in ("rdp", "prv")) < 1.0


def test_calibration_pays_for_a_prior_release_from_the_same_budget():
    release = [(4.0, 1.0, 1)]  # one Gaussian release at q = 1, e.g. the mean image
    alone = calibrate_noise(10.0, 1e-5, 0.5, 200)
    sigma = calibrate_noise(10.0, 1e-5, 0.5, 200, prior=release)
    assert sigma > alone
    assert 9.8 <= epsilon_of(release + [(sigma, 0.5, 200)], 1e-5) <= 10.0
    assert epsilon_of(release + [(sigma / 1.01, 0.5, 200)], 1e-5) > 10.0
    plan = plan_dp(60, 30, 200, 10.0, release_noise=4.0)
    assert plan.noise_multiplier == pytest.approx(sigma) and plan.history() == release + [(sigma, 0.5, 200)]
    assert plan.accountant().history == []  # the session charges the release when it makes it
    assert plan_dp(60, 30, 200, 10.0, release_noise=4.0, min_noise=50.0).noise_multiplier == 50.0
    with pytest.raises(UserError, match="releases .* alone spend ε = .* raise privacy.mean_image_noise"):
        calibrate_noise(1.0, 1e-5, 0.5, 200, prior=release)


def test_unmeetable_target_is_a_user_error():
    with pytest.raises(UserError, match="cannot be met"):
        calibrate_noise(1e-4, 1e-5, 1.0, 1000)


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


def test_budget_check_refuses_to_overspend_and_names_the_ledger():
    sigma = calibrate_noise(1.0, 1e-5, 0.05, 200)
    acc = PrivacyAccountant(0.05, sigma, 1e-5)
    acc.check_budget(1.0, 200)
    acc.step(200)
    assert acc.epsilon()["reported"] <= 1.0
    with pytest.raises(BudgetExceeded, match=r"replace-one.*\(ledger /h/privacy-ledger.json\); training stops"):
        acc.check_budget(1.0, 20, "/h/privacy-ledger.json")
    assert acc.steps == 200


def test_retried_steps_on_the_same_batches_were_under_counted():
    """Attack: a round retried on the same Poisson batches with fresh noise releases those batches twice. Two
    Gaussian releases of one value with independent noise σ are one release at σ/√2; charging them as new
    independent steps reports σ 1, q 0.01: 4.71 where the truth is 5.39 (5000 distinct steps, the last 250
    retried; RDP, as reported then). Hospitals now draw fresh batches for a retry (test_privacy_faults.py), so
    5250 charged steps ARE 5250 independent ones."""
    reported = epsilon_of([(1.0, 0.01, 5250)], 1e-5, "rdp")
    truth = epsilon_of([(1.0, 0.01, 4750), (1.0 / math.sqrt(2), 0.01, 250)], 1e-5, "rdp")
    assert reported == pytest.approx(4.71, abs=0.005) and truth == pytest.approx(5.39, abs=0.005)


def test_a_repeated_mean_image_release_was_under_counted():
    """Attack: a retried first round made the mean-image release again with fresh noise while the accountant
    held one release: target ε 3 (σ 3.655 calibrated by the former max(RDP, PRV) accountant for q 0.05, 1000
    steps and a release at σ 2) became 3.85. A release is now charged and written to the ledger before it is
    computed, and made once (test_privacy_faults.py)."""
    steps = (3.655, 0.05, 1000)
    reported = max(epsilon_of([(2.0, 1.0, 1), steps], 1e-5, m) for m in ("rdp", "prv"))
    truth = max(epsilon_of([(2.0 / math.sqrt(2), 1.0, 1), steps], 1e-5, m) for m in ("rdp", "prv"))
    assert reported == pytest.approx(3.0, abs=0.01) and truth == pytest.approx(3.85, abs=0.01)


def test_client_level_accounting_claims_no_amplification():
    """Attack: participants are a fixed-size sample drawn from the public run seed, yet ε used q = fraction: 3
    hospitals, fraction 0.1, σ 1, 20 rounds reported 4.22 where every round is a full Gaussian release of the
    hospitals that took part (≥ 26 even add/remove). The accountant now takes q = 1."""
    assert epsilon_of([(1.0, 0.1, 20)], 1e-5, "rdp") == pytest.approx(4.22, abs=0.005)
    acc = client_level_accountant(noise_multiplier=1.0, hospitals=3)
    acc.step(20)
    assert acc.unit == "hospital" and acc.sample_rate == 1.0 and acc.delta == 1e-5
    eps = acc.epsilon()
    assert eps["add_remove"] >= analytic_gaussian_epsilon(1.0, 1 / math.sqrt(20), 1e-5) > 26
    assert eps["reported"] == pytest.approx(analytic_gaussian_epsilon(2.0, 1 / math.sqrt(20), 1e-5), rel=2e-3)


def test_epsilons_names_both_relations():
    eps = epsilons([(1.0, 0.01, 500)], 1e-5)
    assert eps["reported"] == eps["replace_one"] and eps["add_remove"] == max(eps["rdp"], eps["prv"])
    assert eps["replace_one"] > eps["add_remove"]
