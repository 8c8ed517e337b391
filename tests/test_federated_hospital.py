"""One hospital's round without Flower: what it shares, FedProx's pull towards the global model, and state that
carries a hospital across rounds exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from medsyngan.config import load_config
from medsyngan.federated.hospital import Hospital, shared_parts

TINY = ["data.size=32", "model.resolution=32", "model.ngf=8", "model.ndf=8", "model.z_dim=16",
        "train.batch_size=8", "privacy.dp=false", "run.seed=4"]


@pytest.fixture(scope="module")
def data(medsyngan_cache):
    from medsyngan.data.api import phantom_dataset

    return phantom_dataset(16, 2, 32, seed=4)


def _hospital(data, *extra):
    cfg = load_config("federated-dcgan64", TINY + list(extra))
    return Hospital(cfg, 0, data), cfg


def _norm(update):
    return float(torch.sqrt(sum((v.double() ** 2).sum() for k, v in update.items() if ".weight" in k)))


def test_update_covers_exactly_the_shared_networks(data):
    hospital, cfg = _hospital(data, "federated.share_discriminator=false")
    assert shared_parts(cfg) == ("G",)
    global_state = hospital.trainer.model_state(("G",))
    result = hospital.train_round(global_state, 2)
    assert set(result.update) == set(global_state) and all(k.startswith("G.") for k in result.update)
    assert result.num_examples == len(data) and result.metrics["images"] == 16


def test_fedprox_keeps_the_local_model_closer_to_the_global_one(data):
    plain, _ = _hospital(data)
    prox, _ = _hospital(data, "federated.strategy=fedprox", "federated.proximal_mu=50")
    start = plain.trainer.model_state(("G", "D"))
    free = plain.train_round(start, 4).update
    pulled = prox.train_round(start, 4).update
    assert _norm(pulled) < 0.9 * _norm(free)


def test_restored_state_continues_exactly(data):
    first, _ = _hospital(data)
    start = first.trainer.model_state(("G", "D"))
    first.train_round(start, 2)
    saved = copy.deepcopy(first.state_dict())  # state_dict() holds live optimizer tensors
    expected = first.train_round(start, 2).update

    second, _ = _hospital(data)
    second.load_state_dict(saved)
    again = second.train_round(start, 2).update
    assert all(torch.equal(expected[k], again[k]) for k in expected)


def test_round_state_on_disk_is_sealed_with_the_hospital_key(data, tmp_path):
    from medsyngan.errors import UserError
    from medsyngan.federated.client import node_identity, persist, restore, state_file
    from medsyngan.federated.protocol import Job
    from medsyngan.federated.records import pack_blob
    from medsyngan.sealed import generate_key_file

    generate_key_file(tmp_path / "state.key")
    node = {"hospital-id": 0, "data-path": "unused", "state-dir": str(tmp_path / "state"),
            "state-key": str(tmp_path / "state.key"), "aggregator-public": "unused"}
    job = Job(config="", run_id="r")
    identity = node_identity(node, job)
    first, _ = _hospital(data)
    start = first.trainer.model_state(("G", "D"))
    first.train_round(start, 2)
    persist(first, identity, 1)
    blob = state_file(identity, 1).read_bytes()
    plain = first.trainer.model_state(("G",))["G.main.0.weight"].numpy().tobytes()
    assert plain[:64] in pack_blob(first.state_dict())  # unsealed, the weights' bytes would be there
    assert blob.startswith(b"MSGC") and plain[:64] not in blob
    expected = first.train_round(start, 2).update

    second, _ = _hospital(data)
    restore(second, identity, 1, None)
    again = second.train_round(start, 2).update
    assert all(torch.equal(expected[k], again[k]) for k in expected)
    without_key = node_identity({k: v for k, v in node.items() if k != "state-key"}, job)
    with pytest.raises(UserError, match="is encrypted; give hospital 0 its key file"):
        restore(_hospital(data)[0], without_key, 1, None)


def test_holdout_fraction_keeps_patients_out_and_zero_keeps_none(data):
    from medsyngan.errors import UserError
    from medsyngan.federated.plan import split_holdout

    patients = data.patients
    train, held = split_holdout(patients, 4, 0, 0.25)
    assert set(patients[train]).isdisjoint(patients[held])
    assert len(set(patients[held])) == round(0.25 * len(set(patients)))
    assert sorted(train.tolist() + held.tolist()) == list(range(len(patients)))
    train, held = split_holdout(patients, 4, 0, 0.0)
    assert len(held) == 0 and len(train) == len(patients)
    with pytest.raises(UserError, match="holdout_fraction=0"):
        split_holdout(patients[:1], 4, 0, 0.1)


def test_mean_image_is_released_once_against_the_global_model_it_trains_from(data, monkeypatch):
    import medsyngan.privacy.moments as moments

    seen = []
    real_mean = moments.generator_mean
    monkeypatch.setattr(moments, "generator_mean", lambda G, size, seed=0, labels=None: seen.append(
        {k: v.clone() for k, v in G.named_parameters()}) or real_mean(G, size, seed, labels))
    hospital, cfg = _hospital(data, "privacy.dp=true", "privacy.target_epsilon=10", "privacy.mean_image_size=4",
                              "federated.rounds=2", "federated.local_steps=2")
    hospital.check_ready()  # the DP session exists before any global model has arrived
    other, _ = _hospital(data, "run.seed=9")
    global_state = other.trainer.model_state(("G", "D"))
    result = hospital.train_round(global_state, 2)
    weights = {k[2:]: v for k, v in global_state.items() if k.startswith("G.") and k[2:] in seen[0]}  # not BN stats
    assert len(seen) == 1 and len(weights) == len(seen[0])
    assert all(torch.equal(seen[0][k], v) for k, v in weights.items())
    assert result.metrics["dp_steps"] == 2 and result.metrics["epsilon"] <= 10
    hospital.train_round(global_state, 2)
    assert len(seen) == 1  # the second round reuses the target
