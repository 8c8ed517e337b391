"""The adversarial harness: a malicious aggregator (ServerApp) and an active relay try every attack of the threat
model (docs/privacy.md) against the real hospital runtime — its ClientApp, policy, ledger, secure-aggregation
client and sealed files — and each attack must be refused or detected.

Every case records the attack, what must happen and what did (``record_property``); `benchmarks/attacks.py`
runs this file and prints them as the table "attack | expected | outcome" with the figure "attacks tried /
refused". Cases that an earlier test already proves run that test itself, so that the harness and the test can
never disagree.
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import test_app_signing
import test_federated_clear
import test_federated_rounds
import test_privacy_crypto
import test_privacy_faults
import test_privacy_secagg
import test_sealed
from medsyngan.config import load_config
from medsyngan.data.api import phantom_dataset
from medsyngan.federated import advert_signing, hospital_keys
from medsyngan.federated import protocol as p
from medsyngan.federated.client import HospitalRuntime, node_identity
from medsyngan.federated.client_app import make_client_app
from medsyngan.federated.hospital import shared_parts
from medsyngan.federated.pki import key_fingerprint
from medsyngan.federated.records import record_to_state, state_to_record
from medsyngan.federated.server import RoundDriver
from medsyngan.federated.transport import tensors_hash
from medsyngan.privacy import secagg as sa
from medsyngan.privacy.crypto import write_identity_key
from medsyngan.rundir import RunDir
from medsyngan.sealed import Binding, generate_key_file
from medsyngan.training.step import GANTrainer
from medsyngan.workflows.federation import prepare_job, simulation_identity_key
from federation_settings import WITHOUT_DP
from test_app_signing import federation  # noqa: F401 - the signed-bundle fixture, for the unsigned-bundle case
from test_fixed_seed_weights import COMMON

#: The product's federated preset (patient-level DP at ε 1, 8-bit updates, AES-GCM, secure aggregation), tiny.
HONEST = COMMON + ["federated.rounds=3", "federated.local_steps=1", "federated.holdout_fraction=0",
                   "privacy.mean_image_size=0"]
#: A hospital whose own policy allows plain transport (still DP at ε ≤ 1), so that one node can be driven round by
#: round without the secure-aggregation stages.
PLAIN_POLICY = "secagg_required = false\nencrypt_required = false\n"
PLAIN = ["privacy.secagg=false", "privacy.encrypt=false", "privacy.quantize_bits=0", "hospital.secagg_required=false",
         "hospital.encrypt_required=false"]


@pytest.fixture(autouse=True)
def server_task(monkeypatch):
    for field, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, field, value)


class Attack:
    """What the harness reports about one case."""

    def __init__(self, record_property):
        self.record = record_property

    def __call__(self, name: str, expected: str) -> "Attack":
        self.record("attack", name)
        self.record("expected", expected)
        return self

    def outcome(self, text: str) -> None:
        self.record("outcome", text)


@pytest.fixture
def attack(record_property) -> Attack:
    return Attack(record_property)


class DeployedHospital:
    """Hospital 0 as a SuperNode runs it: its own data, state key, policy file and pinned aggregator key, and the
    real ClientApp. The malicious aggregator writes whatever instruction it likes."""

    def __init__(self, root: Path, policy: str = "", overrides: tuple[str, ...] = ()):
        data = phantom_dataset(12, 2, 32, seed=7, root=root / "data")
        generate_key_file(root / "state.key")
        self.aggregator_public = write_identity_key(root / "aggregator.key")
        (root / "aggregator.pub").write_bytes(self.aggregator_public)
        (root / "policy.toml").write_text(policy)
        # The federation's keys as `pki` makes them: hospitals 0–2 each with its SuperNode key, a signed roster.
        self.keys = root / "keys"
        self.roster = hospital_keys.simulation_keys(self.keys, 3)
        self.node_config = {"hospital-id": 0, "data-path": str(data.root), "state-dir": str(root / "state"),
                            "state-key": str(root / "state.key"), "aggregator-public": str(root / "aggregator.pub"),
                            "policy": str(root / "policy.toml"), "auth-key": str(self.auth_key(0)),
                            "federation-public": str(self.keys / "federation_app.pub")}
        self.cfg = load_config("federated-dcgan64", HONEST + list(overrides))
        self.app = make_client_app(lambda fake, holdout: {})
        self.context = Context(run_id=1, node_id=100, state=RecordDict(), run_config={}, node_config=self.node_config)
        trainer = GANTrainer(self.cfg, device="cpu")
        self.weights = {k: v for k, v in trainer.model_state(shared_parts(self.cfg)).items() if v.is_floating_point()}

    def auth_key(self, hospital: int) -> Path:
        return self.keys / f"hospital-{hospital}" / "auth.key"

    def job(self, *overrides: str, aggregator_public: bytes | None = None, roster: bytes | None = None) -> p.Job:
        cfg = load_config("federated-dcgan64", HONEST + list(overrides))
        return p.Job(cfg.to_toml(), "adversarial-run", aggregator_public=aggregator_public or self.aggregator_public,
                     roster=roster or self.roster.to_bytes())

    def send(self, message_type: str, job: p.Job, round_: p.RoundInstruction | None = None,
             weights: dict | None = None) -> Message:
        message = Message(p.Instruction(job, round_, weights).to_record(), dst_node_id=100, message_type=message_type)
        message.metadata.__dict__["_message_id"] = uuid4().hex
        return self.app(message, self.context)

    def train(self, job: p.Job, round_: int, resume: int, weights: dict | None = None) -> Message:
        return self.send(p.TRAIN, job, p.RoundInstruction(round_, resume, os.urandom(8)), weights or self.weights)


def refused(reply: Message, code: int = p.REFUSAL_CODE) -> str:
    assert reply.has_error(), "the hospital did what the attacker asked"
    assert reply.error.code == code and "\n" not in reply.error.reason
    return f"refused: {reply.error.reason}"


# --- a malicious aggregator rewrites the instruction -------------------------------------------------------------

@pytest.mark.parametrize(("name", "overrides", "reason"), [
    ("switch DP off", ["privacy.dp=false"], "trains without DP"),
    ("raise the clipping norm", ["privacy.max_grad_norm=5"], "exceeds the hospital policy's ceiling"),
    ("turn encryption off", ["privacy.encrypt=false"], "unencrypted"),
    ("turn secure aggregation off", ["privacy.secagg=false"], "outside secure aggregation"),
    ("protect images, not patients", ["privacy.unit=image"], "image-level DP"),
    ("relax the hospital section it sends", [*WITHOUT_DP], "trains without DP"),
])
def test_an_instruction_weaker_than_the_hospitals_policy_is_refused(tmp_path, medsyngan_cache, attack, name,
                                                                     overrides, reason):
    attack(name, "the hospital's own policy refuses it, one line back to the aggregator")
    hospital = DeployedHospital(tmp_path)
    outcome = refused(hospital.send(p.HELLO, hospital.job(*overrides)))
    assert reason in outcome
    assert not hospital.send(p.HELLO, hospital.job()).has_error()  # the honest instruction is accepted
    attack.outcome(outcome)


def test_a_raised_epsilon_is_capped_at_the_hospitals_own(tmp_path, medsyngan_cache, attack):
    attack("raise ε", "the hospital plans and stops at its own maximum ε (1), whatever the instruction says")
    hospital = DeployedHospital(tmp_path)
    job = hospital.job("privacy.target_epsilon=10")
    identity = node_identity(hospital.node_config, job)
    built = HospitalRuntime().hospital(identity, job)
    built.check_ready()
    assert built.local_cfg.privacy.target_epsilon == 1.0 and built.dp.target_epsilon == 1.0
    attack.outcome(f"capped: the hospital calibrated σ = {built.dp.noise_multiplier:.3f} for ε = "
                   f"{built.dp.target_epsilon:g}, not 10")


def test_a_small_sigma_through_a_short_announced_run_is_stopped_by_the_ledger(tmp_path, medsyngan_cache, attack,
                                                                             monkeypatch):
    attack("lower σ (announce a short run, then keep asking)",
           "σ follows from the hospital's own ε; its ledger refuses the round that would pass it")
    test_privacy_faults.test_a_hospital_whose_ledger_would_pass_its_epsilon_refuses_naming_the_ledger(
        tmp_path, medsyngan_cache, monkeypatch)
    attack.outcome("refused: the hospital's ledger stops training before its ε is passed "
                   "(test_a_hospital_whose_ledger_would_pass_its_epsilon_refuses_naming_the_ledger)")


def test_rounds_past_the_hospitals_maximum_are_refused(tmp_path, medsyngan_cache, attack):
    attack("rounds past max_rounds", "refused in that round")
    hospital = DeployedHospital(tmp_path, "max_rounds = 3\n")
    assert "more than the hospital policy allows" in refused(hospital.send(p.HELLO, hospital.job("federated.rounds=9")))
    attack.outcome(refused(hospital.train(hospital.job(), 4, 3)))


def test_another_aggregator_key_is_refused_before_any_work(tmp_path, medsyngan_cache, attack):
    attack("announce another aggregator key", "the hospital compares it with its pinned key and does no work")
    hospital = DeployedHospital(tmp_path)
    other = write_identity_key(tmp_path / "other.key")
    outcome = refused(hospital.send(p.HELLO, hospital.job(aggregator_public=other)), code=4001)
    assert "differs from the pinned" in outcome
    attack.outcome(outcome)


@pytest.fixture
def trained(tmp_path, medsyngan_cache) -> tuple[DeployedHospital, p.Job]:
    """A deployed hospital that trained rounds 1 and 2 of a run (DP on, plain transport under its policy)."""
    hospital = DeployedHospital(tmp_path, PLAIN_POLICY, tuple(PLAIN))
    job = hospital.job(*PLAIN)
    for round_ in (1, 2):
        reply = hospital.train(job, round_, round_ - 1)
        assert not reply.has_error(), reply.error.reason
    return hospital, job


def test_a_replayed_old_round_is_refused(trained, attack):
    attack("replay an old round's instruction", "refused: the hospital already trained a later round")
    hospital, job = trained
    attack.outcome(refused(hospital.train(job, 1, 0)))


def test_a_round_re_sent_with_another_seed_is_refused(trained, attack):
    attack("re-send a round with a different seed", "refused: the run's seeds are pinned at its first round")
    hospital, _ = trained
    outcome = refused(hospital.train(hospital.job(*PLAIN, "run.seed=99"), 2, 1))
    assert "changes run.seed = 99" in outcome
    attack.outcome(outcome)


def test_a_different_model_to_one_hospital_is_detected_by_the_sealed_update(tmp_path, medsyngan_cache, attack,
                                                                           caplog):
    attack("send a different model to one hospital (relay)",
           "detected: the update is sealed with the hash of the model the hospital received")
    cfg = load_config("federated-dcgan64", test_federated_clear.SEALED)
    run_dir = RunDir(tmp_path / "run").create(cfg)
    logging.getLogger("medsyngan").propagate = True  # as before the run's log handler stopped it: caplog sees it
    driver = RoundDriver(cfg, run_dir, prepare_job(cfg, run_dir, resume=False, simulation=True), False,
                         simulation_identity_key(cfg, run_dir))
    grid = test_federated_rounds.LoopbackGrid(make_client_app(lambda fake, holdout: {}), 3)
    deliver = grid.app

    def swap(message: Message, context: Context) -> Message:
        if message.metadata.message_type == p.TRAIN and message.metadata.dst_node_id == 102:
            crafted = {k: torch.zeros_like(v) for k, v in record_to_state(message.content["weights"]).items()}
            message.content["weights"] = state_to_record(crafted)
        return deliver(message, context)

    grid.app = swap
    with caplog.at_level(logging.ERROR, logger="medsyngan.federated"):
        driver.run(grid)
    assert "reply of hospital 2 rejected" in caplog.text and "computed from another global model" in caplog.text
    assert [r["hospitals_replied"] for r in run_dir.read_metrics() if "hospital" in r] == [[0, 1]]
    attack.outcome("detected: hospital 2's update 'was computed from another global model'; left out of the round")


def _signed_advert(key: Path, round_: int, hospital: int, advert: sa.KeyAdvert, run_id: str = "adversarial-run"):
    return advert_signing.sign_advert(advert_signing.load_hospital_key(key), run_id, round_, hospital, advert)


@pytest.mark.parametrize(("name", "forge", "reason"), [
    ("unsigned", lambda h, fake: None, "hospital 1's key advert is unsigned"),
    ("signed with the aggregator's own key",
     lambda h, fake: advert_signing.sign_advert(ec.generate_private_key(ec.SECP384R1()), "adversarial-run", 1, 1, fake),
     "signed by a key the roster binds to no hospital"),
    ("signed with another hospital's key", lambda h, fake: _signed_advert(h.auth_key(2), 1, 1, fake),
     "signed by a key the roster binds to hospital 2"),
    ("the peer's advert of another round", lambda h, fake: _signed_advert(h.auth_key(1), 7, 1, fake),
     "not signed for run adversarial-run round 1"),
    ("the peer's advert of another run", lambda h, fake: _signed_advert(h.auth_key(1), 1, 1, fake, "another-run"),
     "not signed for run adversarial-run round 1"),
])
def test_an_aggregator_substituting_a_peers_keys_is_refused(tmp_path, medsyngan_cache, attack, name, forge, reason):
    attack(f"substitute a peer's secure-aggregation keys ({name})",
           "the hospital checks every advert against the federation-signed roster and shares nothing")
    hospital = DeployedHospital(tmp_path)
    job = hospital.job()
    terms = p.SecAggTerms.of(sa.SecAggConfig(ids=(1, 2, 3), threshold=2, ring_bits=24, length=8,
                                             context=b"adversarial-run/1"), np.ones(1))
    reply = hospital.send(p.SECAGG_ADVERTISE, job, p.RoundInstruction(1, 0, secagg=terms))
    assert not reply.has_error(), reply.error.reason
    mine = p.KeyAdvertReply.from_record(reply.content)
    adverts = {1: mine.advert, **{u: sa.SecAggClient(u, terms.secagg_config()).advertise() for u in (2, 3)}}
    signatures = {1: mine.signature, **{u: _signed_advert(hospital.auth_key(u - 1), 1, u - 1, adverts[u])
                                        for u in (2, 3)}}

    def share(adverts, signatures) -> Message:
        return hospital.send(p.SECAGG_SHARE, job, p.RoundInstruction(1, 0, secagg=terms, adverts=adverts,
                                                                     signatures=signatures))

    # Keys of the aggregator's own in hospital 1's place (id 2 in secure aggregation): it would receive the shares
    # hospital 0 encrypts to hospital 1 and, impersonating enough peers, rebuild hospital 0's masks.
    fake = sa.SecAggClient(2, terms.secagg_config()).advertise()
    forged = forge(hospital, fake)
    outcome = refused(share({**adverts, 2: fake}, {**{u: s for u, s in signatures.items() if u != 2},
                                                   **({2: forged} if forged is not None else {})}))
    assert reason in outcome and "shares nothing" in outcome
    honest = share(adverts, signatures)  # the same round with every hospital's own advert goes ahead
    assert not honest.has_error(), honest.error.reason
    assert set(p.SharesReply.from_record(honest.content).shares) == {2, 3}
    attack.outcome(outcome)


def test_a_roster_not_signed_with_the_federation_key_is_refused(tmp_path, medsyngan_cache, attack):
    attack("announce a hospital roster of the aggregator's own (its key bound to a peer's id)",
           "refused: the roster must be signed with the federation key the hospital pins")
    hospital = DeployedHospital(tmp_path)
    own_key = ec.generate_private_key(ec.SECP384R1())
    roster = advert_signing.SignedRoster.sign(ed25519.Ed25519PrivateKey.generate(), {
        **hospital.roster.hospitals, 1: key_fingerprint(own_key.public_key())})
    job = hospital.job(roster=roster.to_bytes())
    terms = p.SecAggTerms.of(sa.SecAggConfig(ids=(1, 2, 3), threshold=2, ring_bits=24, length=8,
                                             context=b"adversarial-run/1"), np.ones(1))
    mine = p.KeyAdvertReply.from_record(hospital.send(p.SECAGG_ADVERTISE, job,
                                                      p.RoundInstruction(1, 0, secagg=terms)).content)
    fake = {u: sa.SecAggClient(u, terms.secagg_config()).advertise() for u in (2, 3)}
    signatures = {1: mine.signature, 2: advert_signing.sign_advert(own_key, job.run_id, 1, 1, fake[2]),
                  3: _signed_advert(hospital.auth_key(2), 1, 2, fake[3])}
    outcome = refused(hospital.send(p.SECAGG_SHARE, job, p.RoundInstruction(
        1, 0, secagg=terms, adverts={1: mine.advert, **fake}, signatures=signatures)))
    assert "not signed with the federation key" in outcome
    attack.outcome(outcome)


def _secagg_round(n: int = 5):
    config = sa.SecAggConfig(ids=tuple(range(1, n + 1)), threshold=sa.threshold_for(0.66, n), ring_bits=24,
                             length=64, neighbours=0, context=b"adversarial/1")
    clients = {u: sa.SecAggClient(u, config) for u in config.ids}
    server = sa.SecAggServer(config)
    listed = server.collect_adverts({u: c.advertise() for u, c in clients.items()})
    inboxes = server.route_shares({u: c.share_keys(listed) for u, c in clients.items()})
    rng = np.random.default_rng(0)
    inputs = {u: rng.integers(0, 2 ** 20, config.length, dtype=np.uint32) for u in config.ids}
    return config, clients, server, inboxes, inputs


def test_a_different_model_to_one_hospital_under_secure_aggregation_unmasks_only_noise(attack):
    attack("send a different model to one hospital (aggregator, to single out its update)",
           "its pairwise masks are bound to the model it got: the sum does not cancel")
    config, clients, server, inboxes, inputs = _secagg_round()
    honest, crafted = tensors_hash({"w": torch.zeros(1)}), tensors_hash({"w": torch.ones(1)})
    masked = {u: c.masked_input(inputs[u], inboxes[u], crafted if u == 1 else honest) for u, c in clients.items()}
    survivors = server.collect_masked(masked)
    total = server.unmask({u: c.unmask(survivors) for u, c in clients.items()}, binding=honest)
    k = config.ring_bits
    truth = sum(x.astype(np.int64) for x in inputs.values()) % 2 ** k
    alone = inputs[1].astype(np.int64) % 2 ** k
    assert not np.array_equal(total, truth) and not np.array_equal(total, alone)
    assert np.mean(np.asarray(total, np.int64) == truth) < 0.05
    attack.outcome("detected: the unmasked sum is unrelated to every update (masks of different models do not cancel)")


def test_claiming_a_survivor_dropped_never_yields_both_of_its_secrets(attack):
    attack("claim a hospital dropped after receiving its masked input",
           "each hospital reveals one share per peer; a majority threshold keeps b and s apart")
    config, clients, server, inboxes, inputs = _secagg_round()
    for u, c in clients.items():
        c.masked_input(inputs[u], inboxes[u])
    target, others = 1, [u for u in config.ids if u != 1]
    everyone = frozenset(config.ids)
    best = 0
    # The server tells some hospitals that the target survived (they reveal its self-mask share) and the rest that
    # it dropped (they reveal its mask-key share): no split gives it a threshold of both.
    for size in range(len(others) + 1):
        for told_dropped in itertools.combinations(others, size):
            b_holders = (set(others) - set(told_dropped)) | {target}
            s_holders = set(told_dropped)
            best = max(best, min(len(b_holders), len(s_holders)))
    assert best < config.threshold
    survivor = clients[2]
    assert survivor.unmask(everyone)[target][0] == "b"
    with pytest.raises(sa.SecAggAbort, match="already revealed"):
        survivor.unmask(everyone - {target})
    attack.outcome(f"refused: at most {best} shares of either secret against a threshold of {config.threshold}; "
                   "a second request is refused")


def test_asking_twice_for_shares_is_refused(attack):
    attack("ask twice for unmasking shares", "refused: shares are revealed once per round")
    test_privacy_secagg.test_a_client_never_reveals_both_shares()
    config, clients, server, inboxes, inputs = _secagg_round(3)
    client = clients[1]
    client.masked_input(inputs[1], inboxes[1])
    client.unmask(frozenset(config.ids))
    restored = sa.SecAggClient.from_bytes(client.to_bytes(), config)  # as the ClientApp keeps it between stages
    with pytest.raises(sa.SecAggAbort, match="already revealed") as info:
        restored.unmask(frozenset(config.ids))
    attack.outcome(f"refused: {info.value}")


# --- the network and the deployment -----------------------------------------------------------------------------

def test_an_unknown_node_key_gets_no_work(tmp_path, medsyngan_cache, caplog, monkeypatch, attack):
    attack("an unknown node key asks for work", "never greeted: the roster comes from the PKI manifest")
    test_app_signing.test_the_roster_comes_from_the_manifest_not_from_the_nodes(tmp_path, medsyngan_cache, caplog,
                                                                               monkeypatch)
    attack.outcome("refused: node 103 (unknown key) got no message; node 102 (another hospital's id) only hello")


def test_an_unsigned_bundle_is_refused(federation, attack):  # noqa: F811 - the imported fixture
    attack("run an unsigned app bundle on a hospital", "the SuperNode refuses it before installing it")
    test_app_signing.test_an_unsigned_bundle_is_refused(federation)
    test_app_signing.test_a_bundle_signed_with_another_key_is_refused(federation)
    attack.outcome("refused: 'carries no app-signature' (and a bundle signed with another key)")


def test_a_tampered_ciphertext_is_detected(tmp_path, medsyngan_cache, caplog, attack):
    attack("tamper with a hospital's ciphertext", "AES-GCM authentication fails; that hospital is left out")
    flip = lambda content: content["update"].__setitem__(  # noqa: E731
        "payload", test_federated_rounds._flip_last(content["update"]["payload"]))
    test_federated_rounds.test_a_malformed_reply_counts_that_hospital_out_of_the_round(
        tmp_path, medsyngan_cache, caplog, flip, "failed authentication")
    attack.outcome("detected: 'failed authentication', hospital 2 left out of the round")


def test_a_substituted_round_key_cannot_read_or_forge(attack):
    attack("a relay substitutes the aggregator's round key", "the update is sealed to the identity key as well")
    test_privacy_crypto.test_a_relay_substituting_the_round_key_cannot_read_or_forge()
    attack.outcome("refused: the relay cannot open the update, the aggregator rejects its forgery")


@pytest.mark.parametrize(("elsewhere", "reason"), [
    (Binding("run-b", 500, "checkpoint/meta.json"), "wrong-run"),
    (Binding("run-a", 400, "checkpoint/meta.json"), "wrong-step"),
])
def test_a_sealed_file_from_another_run_or_step_is_refused(attack, elsewhere, reason):
    attack(f"swap in a sealed file from another {reason.removeprefix('wrong-')}",
           "refused: run, step and role are bound into every sealed file")
    test_sealed.test_a_file_sealed_for_another_run_step_or_role_is_refused_under_the_same_key(elsewhere, reason)
    attack.outcome(f"refused: {reason}")


def test_statistics_in_the_clear_are_refused(tmp_path, medsyngan_cache, caplog, attack):
    attack("a hospital's statistics in the clear beside its update", "the aggregator refuses the reply, logs nothing of it")
    test_federated_clear.test_a_hospital_sending_statistics_in_the_clear_is_refused_and_nothing_of_it_is_logged(
        tmp_path, medsyngan_cache, caplog)
    attack.outcome("refused: 'update_norm in the clear', nothing of it in metrics.jsonl")
