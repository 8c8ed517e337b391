"""privacy.clip_only, the clipping-only ablation: DP-SGD's sampling and per-unit clipping with σ = 0. It gives no
privacy, so ε is ∞ wherever it is reported and a ledger that ran it says so for good; a hospital whose own policy
asks for any privacy refuses it, whoever sends it. The accountant's work is bounded: no configuration makes it
allocate gigabytes for a nearly noiseless mechanism."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import tracemalloc

import numpy as np
import pytest
import torch

from medsyngan.config import HospitalSection, load_config
from medsyngan.errors import UserError
from medsyngan.federated.client import node_identity
from medsyngan.federated.hospital import hospital_config
from medsyngan.federated.policy import PolicyRefusal, check, check_simulation
from medsyngan.federated.protocol import Job
from medsyngan.federated.round_log import log_round
from medsyngan.privacy.accounting import (MIN_NOISE, PrivacyAccountant, calibrate_noise, epsilon_of, epsilons,
                                          plan_dp)
from medsyngan.training.step import GANTrainer
from dp_run import train_dp_run
from tiny_dp import enable_dp_from, random_images, tiny_cfg

PRIVATE = "federated-dcgan64"
CLIP_ONLY = ["privacy.clip_only=true"]
#: What a hospital's policy must say before it runs a clipping-only ablation.
PERMISSIVE = ["hospital.dp_required=false", "hospital.max_epsilon=inf"]
PATIENTS = np.array([f"p{i // 2}" for i in range(60)])


@contextlib.contextmanager
def _product_log(caplog):
    """caplog's handler on the product's logger, which does not propagate to the root logger once a run set it up."""
    product = logging.getLogger("medsyngan")
    product.addHandler(caplog.handler)
    level, product.level = product.level, logging.INFO
    try:
        yield
    finally:
        product.removeHandler(caplog.handler)
        product.setLevel(level)


# --------------------------------------------------------------------------- the hospital's policy decides
@pytest.mark.parametrize(("policy", "key"), [
    (HospitalSection(), "hospital.dp_required = true"),
    (HospitalSection(dp_required=True, max_epsilon=math.inf), "hospital.dp_required = true"),
    (HospitalSection(dp_required=False), "hospital.max_epsilon = 1"),
    (HospitalSection(dp_required=False, max_epsilon=math.inf, min_noise_multiplier=0.5),
     "hospital.min_noise_multiplier = 0.5"),
])
def test_a_hospital_whose_policy_asks_for_privacy_refuses_a_clip_only_instruction(policy, key):
    """Attack: the aggregator turns the noise off by sending privacy.clip_only = true, at hello or in any round."""
    cfg = load_config(PRIVATE, CLIP_ONLY)
    for round_ in (None, 1, 3):
        with pytest.raises(PolicyRefusal, match=f"^hospital 2 refuses: .*clip_only.*{key}") as info:
            check(policy, cfg, 2, round_)
        assert "\n" not in str(info.value)
    with pytest.raises(PolicyRefusal, match=key):  # also where a hospital is built, whatever called it
        hospital_config(cfg, 2, policy)


def test_only_a_policy_without_dp_min_noise_or_finite_epsilon_runs_clip_only():
    cfg = load_config(PRIVATE, CLIP_ONLY)
    policy = HospitalSection(dp_required=False, max_epsilon=math.inf)
    check(policy, cfg, 0, 1)
    assert hospital_config(cfg, 0, policy).privacy.clip_only


def test_the_aggregator_cannot_relax_a_deployed_hospitals_policy_to_clip_only(tmp_path):
    """Attack: the instruction carries a [hospital] section that allows clip-only; a deployed hospital reads its
    own policy file (or the product defaults) and refuses."""
    relaxed = load_config(PRIVATE, CLIP_ONLY + PERMISSIVE)
    check_simulation(relaxed)  # the instruction is self-consistent: only the hospital's own policy can stop it
    job = Job(config=relaxed.to_toml(), run_id="r")
    pinned = {"hospital-id": 0, "data-path": "unused", "aggregator-public": "unused", "state-dir": str(tmp_path)}
    for policy_file in ("", "[hospital]\ndp_required = false\nmax_epsilon = 1e6\n"):
        node = {**pinned}
        if policy_file:
            (tmp_path / "policy.toml").write_text(policy_file)
            node["policy"] = str(tmp_path / "policy.toml")
        deployed = node_identity(node, job)
        with pytest.raises(PolicyRefusal, match="clip_only"):
            check(deployed.policy_for(relaxed), relaxed, 0)


def test_a_simulation_whose_hospitals_would_refuse_clip_only_stops_before_it_starts():
    with pytest.raises(UserError, match="clip_only.*set hospital.dp_required to match"):
        check_simulation(load_config(PRIVATE, CLIP_ONLY))
    with pytest.raises(UserError, match="clip_only.*set hospital.max_epsilon to match"):
        check_simulation(load_config(PRIVATE, CLIP_ONLY + ["hospital.dp_required=false"]))


def test_clip_only_without_dp_is_a_one_line_error():
    with pytest.raises(UserError, match="privacy.clip_only .*needs privacy.dp = true"):
        load_config(None, CLIP_ONLY)


def test_a_policy_floor_on_sigma_refuses_a_clip_only_plan():
    with pytest.raises(UserError, match="hospital.min_noise_multiplier = 0.5"):
        plan_dp(60, 8, 100, 1.0, min_noise=0.5, clip_only=True)


# --------------------------------------------------------------------------- the centralized runner
def test_the_centralized_runner_refuses_clip_only_under_a_dp_policy(tmp_path):
    with pytest.raises(PolicyRefusal, match="hospital.dp_required = true"):
        train_dp_run(tmp_path / "refused", *CLIP_ONLY)
    assert not list((tmp_path / "refused").glob("checkpoints/*"))


@pytest.mark.slow
def test_a_clip_only_centralized_run_reports_epsilon_infinite_in_its_metrics_and_checkpoint(tmp_path, caplog):
    from medsyngan.training.checkpoint import load_checkpoint
    from medsyngan.workflows.export import privacy_record

    with _product_log(caplog):
        run = train_dp_run(tmp_path / "run", *CLIP_ONLY, *PERMISSIVE)
    rows = [r for r in run.read_metrics() if "epsilon" in r]
    assert rows and all(math.isinf(r["epsilon"]) and math.isinf(r["epsilon_add_remove"]) for r in rows)
    assert "NO privacy, ε = ∞" in caplog.text
    meta = load_checkpoint(run.checkpoints, None).meta
    assert meta["dp"]["accountant"]["noise_multiplier"] == 0.0
    privacy = privacy_record(run, meta)
    assert not privacy["differential_privacy"] and math.isinf(privacy["guarantees"][0]["epsilon"])


# --------------------------------------------------------------------------- the session and its ledger
def _clip_only_session(seed: int, *extra: str):
    cfg = tiny_cfg("privacy.dp=true", *CLIP_ONLY, *extra)
    torch.manual_seed(0)
    trainer = GANTrainer(cfg, device="cpu")
    return cfg, trainer, enable_dp_from(cfg, trainer, random_images(), PATIENTS, planned_steps=10, seed=seed)


def test_clip_only_clips_per_patient_adds_no_noise_and_reports_infinite_epsilon():
    cfg, trainer, session = _clip_only_session(1, "privacy.max_grad_norm=0.5")
    assert session.noise_multiplier == 0 and math.isinf(session.target_epsilon)
    assert session.unit == "patient" and session.sample_rate == pytest.approx(8 / 30)
    clips = []
    gradients = session.update.engine.gradients
    session.update.engine.gradients = lambda t, r, f, clip, *a, **k: clips.append(clip) or gradients(t, r, f, clip,
                                                                                                   *a, **k)
    batch = torch.rand(6, 1, 32, 32) * 2 - 1
    trainer.train_step(lambda: batch)
    assert clips == [0.5]
    assert session.metrics() == {"epsilon": math.inf, "epsilon_add_remove": math.inf}
    # Another secret seed draws other noise: none is drawn, so the same batch gives the same update.
    _, other, again = _clip_only_session(2, "privacy.max_grad_norm=0.5")
    other.train_step(lambda: batch)
    for key, value in other.model_state(("D",)).items():
        torch.testing.assert_close(value, trainer.model_state(("D",))[key], rtol=0, atol=0)


def test_a_ledger_that_ran_clip_only_reports_infinite_epsilon_for_good():
    cfg, trainer, session = _clip_only_session(3)
    trainer.train_step(session.next_real)
    state = json.loads(json.dumps(session.state_dict()))
    assert math.isinf(state["target_epsilon"])
    assert math.isinf(PrivacyAccountant.from_state_dict(state["accountant"]).epsilon()["reported"])
    private = tiny_cfg("privacy.dp=true", "privacy.target_epsilon=3")
    with pytest.raises(UserError, match=r"started clipping only \(σ = 0\) but privacy.clip_only = false"):
        enable_dp_from(private, GANTrainer(private, device="cpu"), random_images(), PATIENTS, state=state)
    # The accountant itself never forgets the noiseless steps, whatever comes after them.
    accountant = PrivacyAccountant.from_state_dict(state["accountant"])
    accountant.set_mechanism(noise_multiplier=5.0)
    accountant.step(100)
    assert math.isinf(accountant.epsilon()["reported"]) and math.isinf(accountant.epsilon()["add_remove"])


def test_a_private_ledger_cannot_be_continued_without_noise():
    """Attack: after private rounds, clip_only is switched on to go on training on the same ledger."""
    cfg = tiny_cfg("privacy.dp=true", "privacy.target_epsilon=3")
    trainer = GANTrainer(cfg, device="cpu")
    session = enable_dp_from(cfg, trainer, random_images(), PATIENTS, planned_steps=10, seed=4)
    trainer.train_step(session.next_real)
    clip_only = tiny_cfg("privacy.dp=true", *CLIP_ONLY)
    with pytest.raises(UserError, match="started with noise σ = .* but privacy.clip_only = true"):
        enable_dp_from(clip_only, GANTrainer(clip_only, device="cpu"), random_images(), PATIENTS,
                       state=session.state_dict())


def test_the_round_log_prints_infinite_epsilon(caplog):
    with _product_log(caplog):
        log_round({"round": 1, "hospitals_replied": [0, 1], "d_loss": None, "g_loss": None, "epsilon": math.inf,
                   "relation": "replace-one"}, 8)
    assert "ε ≤ ∞ (replace-one)" in caplog.text


# --------------------------------------------------------------------------- the accountant's work is bounded
def test_a_target_only_a_nearly_noiseless_sigma_meets_is_refused_quickly():
    """Attack: privacy.target_epsilon = 10 000 would calibrate σ ≈ 0.09, whose accounting took a hospital's
    process past 8 GB."""
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"target ε = 10000 needs a noise multiplier below 0.3 .*set "
                                        r"privacy.target_epsilon ≤ \d+.*privacy.clip_only = true") as info:
        calibrate_noise(10_000, 1e-5, 0.7, 200)
    assert "\n" not in str(info.value) and time.perf_counter() - start < 30


@pytest.mark.parametrize("sigma", [0.05, MIN_NOISE / 2])
def test_a_sigma_below_the_floor_is_refused_before_anything_is_allocated(sigma):
    with pytest.raises(UserError, match=f"σ = {sigma:.3g} is below {MIN_NOISE:g}.*privacy.clip_only"):
        epsilon_of([(1.0, 0.5, 10), (sigma, 0.7, 200)], 1e-5)
    with pytest.raises(UserError, match="is below"):
        PrivacyAccountant(0.5, sigma, 1e-5)


def test_accounting_at_the_floor_stays_within_a_gigabyte():
    """At the smallest σ accounted and a long run, Opacus' PRV grid would take tens of GB: it counts as ∞ instead
    (an upper bound), and the reported replace-one figure is computed within the bound."""
    tracemalloc.start()
    try:
        eps = epsilons([(MIN_NOISE, 0.75, 2000)], 1e-5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**30
    assert math.isinf(eps["prv"]) and math.isinf(eps["add_remove"]) and math.isfinite(eps["reported"])
    assert eps["rdp"] < math.inf


# --------------------------------------------------------------------------- the ε sweep's ablation rows
def test_the_ablation_rows_change_only_what_they_ablate_and_their_hospitals_accept_them(tmp_path):
    from medsyngan.workflows.experiment import load_experiment
    from test_study import EPS, _flat, _workspace

    eps = load_experiment(EPS)
    ws = _workspace(eps, tmp_path, eps.study.budget)
    reference = _flat(ws.plan("eps-1", 0).cfg)
    ablates = {"eps-clip-only": {"privacy.clip_only", "hospital.dp_required", "hospital.max_epsilon"},
               "eps-1-clip-4": {"privacy.max_grad_norm", "hospital.max_grad_norm"}}
    for row, keys in ablates.items():
        cfg = ws.plan(row, 0).cfg
        assert {k for k, v in _flat(cfg).items() if reference[k] != v} == keys | {"run.name"}, row
        check_simulation(cfg)
        assert row in eps.study.rows and row not in eps.study.quick_rows
    clip4 = ws.plan("eps-1-clip-4", 0).cfg
    assert clip4.privacy.max_grad_norm == clip4.hospital.max_grad_norm == 4.0 and clip4.privacy.dp
    assert "a priori" in eps.book["eps-1-clip-4"].chosen_on["privacy.max_grad_norm, hospital.max_grad_norm"]


# --------------------------------------------------------------------------- `medsyngan privacy`
def test_the_privacy_command_plans_clip_only_at_sigma_zero_and_infinite_epsilon(monkeypatch, capsys,
                                                                                 medsyngan_cache):
    from cli_run import run_cli

    overrides = ["data.phantom_patients=20", "data.phantom_images_per_patient=2", "train.batch_size=4",
                 "train.steps=50", "privacy.dp=true", *CLIP_ONLY]
    code, out, err = run_cli(monkeypatch, capsys, "privacy", "--config", "dcgan64",
                             *[a for o in overrides for a in ("--set", o)])
    assert code == 0, err
    assert "NO privacy (ε = ∞)" in out and "centralized: ε = ∞ (replace-one patient); add/remove-one ∞" in out
    assert "0.0000" in out  # σ


def test_the_privacy_command_refuses_a_target_it_cannot_account_in_one_line(monkeypatch, capsys):
    from cli_run import run_cli

    code, _, err = run_cli(monkeypatch, capsys, "privacy", "--target-epsilon", "10000", "--sample-rate", "0.7",
                           "--steps", "200")
    assert code == 2 and "needs a noise multiplier below 0.3" in err and len(err.strip().splitlines()) == 1


def test_the_membership_bound_of_an_infinite_epsilon_is_no_bound():
    from medsyngan.metrics.privacy_audit import dp_auc_bound, dp_tpr_bound

    assert dp_auc_bound(math.inf, 1e-5) == pytest.approx(1.0)
    assert np.array_equal(dp_tpr_bound(np.array([0.0, 1e-3, 0.5]), math.inf, 1e-5), np.ones(3))
