"""A hospital's own privacy policy: it refuses instructions weaker than its policy (hello and every round), caps
ε and δ, is never taken from the aggregator in a deployment, and a simulation whose two halves disagree stops
before it starts with the key named. Damaged hospital state is a one-line error naming the file."""

from __future__ import annotations

import logging
from uuid import uuid4

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from medsyngan.config import HospitalSection, load_config
from medsyngan.errors import UserError
from medsyngan.federated import protocol as p
from medsyngan.federated.client import node_identity, persist, restore, state_file
from medsyngan.federated.client_app import make_client_app
from medsyngan.federated.policy import PolicyRefusal, check, check_simulation, effective_privacy, load_policy
from medsyngan.federated.protocol import Job
from medsyngan.federated.server import RoundDriver
from medsyngan.rundir import RunDir
from medsyngan.workflows.federation import prepare_job, simulation_identity_key
from federation_settings import WITHOUT_DP
from test_fixed_seed_weights import COMMON
from test_federated_rounds import LoopbackGrid

PRIVATE = "federated-dcgan64"  # DP ε = 1, 8-bit, AES-GCM, secure aggregation: what the default policy accepts


@pytest.fixture(autouse=True)
def server_task(monkeypatch):
    for field, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, field, value)


@pytest.mark.parametrize(("overrides", "refusal"), [
    (["privacy.dp=false"], "trains without DP"),
    (["privacy.encrypt=false"], "unencrypted"),
    (["privacy.secagg=false"], "outside secure aggregation"),
    (["privacy.max_grad_norm=5"], "exceeds the hospital policy's ceiling"),
    (["privacy.unit=image"], "image-level DP"),
])
def test_the_default_policy_refuses_anything_weaker(overrides, refusal):
    """Attack: the aggregator decides a hospital's privacy by what it writes in the instruction."""
    cfg = load_config(PRIVATE, overrides)
    with pytest.raises(PolicyRefusal, match=f"^hospital 3 refuses: .*{refusal}") as info:
        check(HospitalSection(), cfg, 3, 1)
    assert "\n" not in str(info.value)
    check(HospitalSection(), load_config(PRIVATE), 3, 1)  # the product default passes


def test_budgets_are_capped_not_refused_and_rounds_are_limited():
    policy = HospitalSection(max_epsilon=2.0, max_delta=1e-6, max_rounds=4)
    privacy = load_config(PRIVATE, ["privacy.target_epsilon=10", "privacy.delta=1e-5"]).privacy
    mine = effective_privacy(policy, privacy)
    assert (mine.target_epsilon, mine.delta, mine.unit) == (2.0, 1e-6, "patient")
    assert effective_privacy(HospitalSection(), load_config(PRIVATE, ["privacy.target_epsilon=0.5"]).privacy
                             ).target_epsilon == 0.5
    with pytest.raises(PolicyRefusal, match=r"federated.rounds = 20, more than .* \(hospital.max_rounds = 4\)"):
        check(policy, load_config(PRIVATE), 0)
    cfg = load_config(PRIVATE, ["federated.rounds=4"])
    check(policy, cfg, 0, 4)
    with pytest.raises(PolicyRefusal, match="round 5 is past"):
        check(policy, cfg, 0, 5)


def test_a_deployed_hospital_reads_its_own_policy_file_never_the_instruction(tmp_path):
    """Attack: an aggregator relaxes the [hospital] section of the configuration it sends."""
    relaxed = load_config(PRIVATE, [*WITHOUT_DP])
    job = Job(config=relaxed.to_toml(), run_id="r")
    pinned = {"hospital-id": 0, "data-path": "unused", "aggregator-public": "unused"}
    deployed = node_identity({**pinned, "state-dir": str(tmp_path)}, job)
    with pytest.raises(PolicyRefusal, match="trains without DP"):
        check(deployed.policy_for(relaxed), relaxed, 0)
    (tmp_path / "policy.toml").write_text("[hospital]\ndp_required = false\nmax_epsilon = 3.0\n")
    own = node_identity({**pinned, "policy": str(tmp_path / "policy.toml")}, job)
    assert own.policy_for(relaxed).max_epsilon == 3.0 and not own.policy_for(relaxed).dp_required
    virtual = node_identity({"partition-id": 0}, job)
    assert virtual.policy_for(relaxed) == relaxed.hospital  # a simulation's hospitals share the server's machine


@pytest.mark.parametrize(("text", "message"), [
    ("max_epsilon = 'x'", "bad value for 'max_epsilon'"),
    ("epsilon = 1", "unknown key 'epsilon'"),
    ("max_epsilon = ", "not valid TOML"),
])
def test_a_bad_policy_file_is_one_line(tmp_path, text, message):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_policy(path)
    with pytest.raises(UserError, match="cannot read the hospital policy"):
        load_policy(tmp_path / "missing.toml")


@pytest.mark.parametrize(("overrides", "key"), [
    (["privacy.dp=false"], "hospital.dp_required"),
    (["privacy.secagg=false"], "hospital.secagg_required"),
    (["privacy.target_epsilon=10"], "hospital.max_epsilon"),
])
def test_a_simulation_whose_halves_disagree_names_the_key(tmp_path, overrides, key):
    cfg = load_config(PRIVATE, overrides)
    with pytest.raises(UserError, match=key) as info:
        check_simulation(cfg)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=key):
        prepare_job(cfg, RunDir(tmp_path / "run").create(cfg), resume=False, simulation=True)
    check_simulation(load_config(PRIVATE))


TINY = COMMON + ["federated.rounds=1", "federated.local_steps=1", "federated.holdout_fraction=0",
                 "federated.round_retries=0", *WITHOUT_DP]


def test_hospitals_that_refuse_stop_the_run_with_their_reasons(tmp_path, medsyngan_cache, caplog):
    """Hospitals whose policy refuses the instruction answer with the reason; the aggregator logs each refusal and
    stops when fewer than the quorum are ready, quoting them."""
    cfg = load_config(PRIVATE, TINY + ["federated.quorum=3"])
    run_dir = RunDir(tmp_path / "run").create(cfg)
    job = prepare_job(cfg, run_dir, resume=False, simulation=True)
    driver = RoundDriver(cfg, run_dir, job, False, simulation_identity_key(cfg, run_dir))
    grid = LoopbackGrid(make_client_app(lambda fake, holdout: {}), 3)
    # Deployed (its own node config, no policy file): the product defaults.
    grid.contexts[102].node_config = {"hospital-id": 2, "data-path": "unused", "aggregator-public": "unused"}
    with caplog.at_level(logging.ERROR, logger="medsyngan.federated"):
        with pytest.raises(UserError, match=r"only 2 of 3 hospitals ready \(quorum 3\): hospital 2 refuses: the "
                                            r"instruction trains without DP"):
            driver.run(grid)
    assert "hospital refused to start" in caplog.text and "hospital 2 refuses" in caplog.text


def _train_message(job: Job, round_: int, resume: int, weights) -> Message:
    message = Message(p.Instruction(job, p.RoundInstruction(round_, resume), weights).to_record(), dst_node_id=7,
                      message_type=p.TRAIN)
    message.metadata.__dict__["_message_id"] = uuid4().hex
    return message


def test_a_round_past_the_policy_is_refused_in_that_round(tmp_path, medsyngan_cache):
    cfg = load_config(PRIVATE, TINY + ["hospital.max_rounds=1", "privacy.secagg=false",
                                       "hospital.secagg_required=false"])
    run_dir = RunDir(tmp_path / "run").create(cfg)
    job = prepare_job(cfg, run_dir, resume=False, simulation=True)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = make_client_app(lambda fake, holdout: {})(_train_message(job, 2, 1, {}), context)
    assert reply.has_error() and reply.error.code == p.REFUSAL_CODE
    assert reply.error.reason == "hospital 0 refuses: round 2 is past the hospital policy's hospital.max_rounds = 1"


@pytest.mark.parametrize("damage", ["truncated", "garbled", "not a state"])
def test_damaged_round_state_is_one_line_naming_the_file(tmp_path, medsyngan_cache, damage):
    """Attack/fault: a truncated or garbled round-NNNNN.pt must not become an UnpicklingError traceback."""
    from medsyngan.federated.hospital import Hospital
    from medsyngan.federated.records import pack_blob
    from test_federated_hospital import TINY as HOSPITAL_TINY

    from medsyngan.data.api import phantom_dataset

    data = phantom_dataset(8, 2, 32, seed=4)
    cfg = load_config(PRIVATE, HOSPITAL_TINY)
    identity = node_identity({"hospital-id": 0, "data-path": "unused", "aggregator-public": "unused", "state-dir": str(tmp_path)},
                             Job("", "r"))
    hospital = Hospital(cfg, 0, data)
    persist(hospital, identity, 1)
    path = state_file(identity, 1)
    blob = path.read_bytes()
    path.write_bytes({"truncated": blob[: len(blob) // 2], "garbled": bytes(b ^ 0x5A for b in blob),
                      "not a state": pack_blob([1, 2, 3])}[damage])
    with pytest.raises(UserError, match=f"^hospital state file {path} (is damaged|holds no hospital state).*backup"):
        restore(Hospital(cfg, 0, data), identity, 1, None)


@pytest.mark.parametrize("content", [b"{\"accountant\": ", b"\xff\xfe", b"[]"])
def test_a_damaged_ledger_is_one_line_naming_it(tmp_path, content):
    from medsyngan.federated.client import FileLedger

    identity = node_identity({"hospital-id": 0, "data-path": "unused", "aggregator-public": "unused", "state-dir": str(tmp_path)},
                             Job("", "r"))
    ledger = FileLedger(identity)
    ledger.path.parent.mkdir(parents=True)
    ledger.path.write_bytes(content)
    with pytest.raises(UserError, match=f"^the privacy ledger {ledger.path} is damaged .*restore it"):
        ledger.read()
