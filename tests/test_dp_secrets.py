"""The DP noise and sampling seed is never written in plaintext: an attacker holding a DP run's checkpoints (and its
logs, metrics and configuration) cannot rebuild the noise added to D, while ε stays readable and the run resumes
with its key."""

from __future__ import annotations

import json
import stat
import tomllib

import pytest

from medsyngan.config import load_config
from medsyngan.errors import UserError
from medsyngan.privacy.session import NOISE_STREAM, DPSession, stream_seed
from medsyngan.rundir import RunDir
from medsyngan.sealed import MAGIC
from medsyngan.training.checkpoint import RUN_KEY, SECRET_FILE, load_checkpoint

from dp_run import MODEL_ONLY, train_dp_run


@pytest.fixture
def noise_seeds(monkeypatch):
    """The torch seed of each private step's noise, as the running session draws it (the ground truth that an
    attacker tries to rebuild), and the session's secret."""
    seen: dict[str, object] = {"steps": {}}
    original = DPSession.noise_generator

    def spy(self, step):
        gen = original(self, step)
        seen["steps"][step] = gen.initial_seed()
        seen["secret"] = self.sampler.seed
        return gen

    monkeypatch.setattr(DPSession, "noise_generator", spy)
    return seen


def _train(tmp_path, *extra: str, resume: bool = False) -> RunDir:
    return train_dp_run(tmp_path / "run", *extra, resume=resume)


def _integers(value) -> set[int]:
    """Every integer anywhere in a JSON document: the candidate seeds an attacker tries."""
    if isinstance(value, bool):
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, dict):
        return set().union(*map(_integers, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(_integers, value)) if value else set()
    return set()


def _attacker_candidates(run: RunDir) -> set[int]:
    """What an attacker without the key reads: every JSON document of every checkpoint (meta.json, the header
    of the weights file, secret.bin if it were JSON), the metrics and the configuration's numbers."""
    found: set[int] = set()
    for folder in run.checkpoints.glob("step-*"):
        for file in folder.iterdir():
            blob = file.read_bytes()
            for doc in (blob, blob[8:8 + int.from_bytes(blob[:8], "little")]):
                try:
                    found |= _integers(json.loads(doc))
                except (UnicodeDecodeError, ValueError):
                    pass
    for line in run.metrics_path.read_text().splitlines():
        found |= _integers(json.loads(line))
    return found | _integers(tomllib.loads(run.config_path.read_text()))


def _rebuilds_noise(candidates: set[int], truth: dict[int, int]) -> bool:
    step, seed = max(truth.items())
    return any(stream_seed(c, NOISE_STREAM, step) == seed for c in candidates if 0 <= c < 2**64)


def test_the_noise_of_a_dp_run_cannot_be_rebuilt_from_its_checkpoints_without_the_key(tmp_path, noise_seeds):
    """Attack: rebuild D's DP noise from a copied checkpoint (the seed in meta.json would give every step's noise,
    and with it the exact clipped gradient sum of the private batch)."""
    run = _train(tmp_path)
    truth, secret = noise_seeds["steps"], noise_seeds["secret"]
    assert len(truth) == 3

    # Without the key: no number in any readable file is the seed, and its bytes are nowhere in the run directory.
    assert not _rebuilds_noise(_attacker_candidates(run), truth)
    needles = [str(secret).encode(), secret.to_bytes(8, "little"), secret.to_bytes(8, "big")]
    for file in run.root.rglob("*"):
        if file.is_file() and RUN_KEY.parts[0] not in file.relative_to(run.root).parts:
            assert not any(n in file.read_bytes() for n in needles), file

    # ε is still readable from meta.json, and the secret sits sealed beside it.
    ckpt = run.checkpoints / "step-000003"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["dp"]["accountant"]["history"] and "sampler" not in meta["dp"]
    assert (ckpt / SECRET_FILE).read_bytes().startswith(MAGIC)
    key = run.root / RUN_KEY
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and "checkpoints" not in key.parts

    # With the run's key the secret opens, and it is exactly what rebuilds the noise.
    opened = load_checkpoint(ckpt).secret()["dp"]
    assert opened["sampler"]["seed"] == secret and opened["sampler"]["draws"] == 3
    assert _rebuilds_noise({opened["sampler"]["seed"]}, truth)
    assert "created key file" in (run.log_path).read_text()


def test_a_dp_run_resumes_its_secret_streams_and_needs_the_key_to(tmp_path, noise_seeds, monkeypatch):
    from medsyngan.workflows import centralized

    class StopAfterTwoSteps(centralized.StopRequest):
        """A stop request that arrives after the second step (as Ctrl-C would)."""

        checks = 0

        @property
        def requested(self) -> bool:
            self.checks += 1
            return self.checks > 2

        @requested.setter
        def requested(self, value: bool) -> None:
            pass

    with monkeypatch.context() as patch:
        patch.setattr(centralized, "StopRequest", StopAfterTwoSteps)
        run = _train(tmp_path, "train.steps=4")
    assert load_checkpoint(run.root).meta["step"] == 2
    first = noise_seeds["secret"]
    _train(tmp_path, "train.steps=4", resume=True)
    assert noise_seeds["secret"] == first  # the same secret streams continue: no new seed, no reused batch
    assert sorted(noise_seeds["steps"]) == [0, 1, 2, 3]
    assert load_checkpoint(run.root).meta["dp"]["accountant"]["history"][-1][2] == 4

    (run.root / RUN_KEY).unlink()
    with pytest.raises(UserError, match=r"secret\.bin is encrypted; pass --key FILE") as info:
        _train(tmp_path, "train.steps=6", resume=True)
    assert "\n" not in str(info.value)


def test_with_a_checkpoint_key_the_secret_is_sealed_with_it_and_no_run_key_is_made(tmp_path, noise_seeds):
    from medsyngan.sealed import generate_key_file

    generate_key_file(tmp_path / "ckpt.key")
    run = _train(tmp_path, f"privacy.checkpoint_key={tmp_path / 'ckpt.key'}")
    assert not (run.root / RUN_KEY).exists()
    ckpt = load_checkpoint(run.root)  # the key named by the run's config.toml
    assert ckpt.secret()["dp"]["sampler"]["seed"] == noise_seeds["secret"]


def test_the_client_level_dp_seed_of_a_federated_checkpoint_is_sealed(tmp_path):
    """Attack: read the server's DP-FedAvg noise seed from a round checkpoint of a run without a checkpoint key."""
    from medsyngan.federated.server_state import ServerState, load_server_state, save_server_state
    from medsyngan.privacy.accounting import client_level_accountant

    cfg = load_config("dcgan64", MODEL_ONLY)
    run = RunDir(tmp_path / "fed").create(cfg)
    state = ServerState.initial(cfg)
    seed = 0x1234_5678_9ABC_DEF
    state.round, state.client_dp = 1, {"accountant": client_level_accountant(1.0, 3).state_dict(), "seed": seed}
    folder = save_server_state(run, state, cfg)
    for file in folder.iterdir():
        blob = file.read_bytes()
        assert str(seed).encode() not in blob and seed.to_bytes(8, "little") not in blob, file
    assert "client_dp_accountant" in json.loads((folder / "meta.json").read_text())
    assert load_server_state(run).client_dp == state.client_dp


def test_virtual_hospitals_of_a_dp_simulation_seal_their_state_with_the_run_key(tmp_path, medsyngan_cache):
    """Hospital state holds the DP seed: in a simulation without a checkpoint key it is sealed with the run's own
    key file rather than written in plaintext."""
    from medsyngan.workflows.federation import prepare_job

    cfg = load_config("dcgan64", MODEL_ONLY + ["privacy.dp=true", "federated.enabled=true", "data.phantom_patients=12",
                                           "hospital.encrypt_required=false", "hospital.secagg_required=false",
                                           "hospital.dp_required=false"])
    run = RunDir(tmp_path / "sim").create(cfg)
    job = prepare_job(cfg, run, resume=False, simulation=True)
    assert job.state_key == str((run.root / RUN_KEY).resolve()) and job.run_id == run.run_id()
    plain = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"dp": False})})
    assert not prepare_job(plain, run, resume=True, simulation=True).state_key


def test_the_secret_split_keeps_unknown_fields_secret():
    from medsyngan.workflows.centralized import DP_PUBLIC_STATE, split_dp_state

    state = {name: 1 for name in DP_PUBLIC_STATE} | {"sampler": {"seed": 7}, "noise_counter": 3}
    public, secret = split_dp_state(state)
    assert set(public) == set(DP_PUBLIC_STATE) and secret == {"sampler": {"seed": 7}, "noise_counter": 3}
    assert {**public, **secret} == state
