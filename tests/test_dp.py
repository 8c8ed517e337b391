"""DP-SGD on the discriminator: per-sample gradients against a per-example loop, noise scale, equality with the
non-private step at σ = 0, accounting of every private step, persistent state, budget refusal, empty batches,
patient-level sampling and bad models. (Opacus' golden value is tested in test_privacy_accounting.py.)"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medsyngan.errors import UserError
from medsyngan.privacy.accounting import BudgetExceeded, PrivacyAccountant
from medsyngan.privacy.dp import DPSession, privacy_unit
from medsyngan.privacy.engines import make_engine
from medsyngan.privacy.sampling import PoissonUnitSampler
from medsyngan.training.step import DiscriminatorUpdate, GANTrainer, unwrap
from tiny_dp import SIZE, enable_dp_from, random_images as _images, tiny_cfg as _cfg


def _session(trainer: GANTrainer, sigma: float, clip: float, expected: int = 8, engine: str = "auto",
             units: int = 80, target: float = math.inf) -> DPSession:
    """A session at a given σ, without calibration."""
    sampler = PoissonUnitSampler(_images(units), None, expected, "image", seed=3)
    accountant = PrivacyAccountant(sampler.sample_rate, sigma, 1e-5)
    session = DPSession(trainer, sampler, accountant, target, clip, 10**9, 10**9, engine)
    trainer.d_update = session.update
    return session


class _BiasedD(nn.Module):
    """Conv with bias, GroupNorm, Linear with bias: every ghost rule with biases."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, 2, 1)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * (SIZE // 2) ** 2, 1)
        self.resolution = SIZE

    def forward(self, x):
        return self.fc(F.leaky_relu(self.norm(self.conv(x)), 0.2).flatten(1)).reshape(-1)


class _Scaled(nn.Module):
    """A layer the ghost engine does not know: the session must fall back to torch.func."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.scale


def _grads(loss: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True)  # ProGAN: layers of other stages are unused
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _clipped_loop(losses, params, clip: float | None, scale: float) -> list[torch.Tensor]:
    """Σ_i clip(∇ loss_i) · scale, one backward per sample (no clipping when clip is None)."""
    total = [torch.zeros_like(p) for p in params]
    for loss in losses:
        grads = _grads(loss, params)
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        factor = 1.0 if clip is None else min(1.0, clip / (norm.item() + 1e-6))
        total = [t + g * factor * scale for t, g in zip(total, grads)]
    return total


def _reference(trainer: GANTrainer, real, fake, clip: float, expected: float,
               fake_clip: float | None = None) -> list[torch.Tensor]:
    """Σ_i clip(∇ real loss_i) / expected + the mean fake gradient (each clipped to fake_clip when given)."""
    params = [p for p in trainer.D.parameters() if p.requires_grad]
    real_part = _clipped_loop([trainer.d_real_loss(trainer.D, real[i:i + 1])[0] for i in range(real.shape[0])],
                              params, clip, 1 / expected)
    m = fake.shape[0]
    fake_part = _clipped_loop([trainer.d_fake_loss(trainer.D, fake[j:j + 1])[0] for j in range(m)],
                              params, fake_clip, 1 / m)
    return [a + b for a, b in zip(real_part, fake_part)]


@pytest.mark.parametrize("arch,engine,disc", [
    ("dcgan", "ghost", None), ("dcgan", "vmap", None), ("dcgan", "loop", None),
    ("stylegan2", "ghost", None), ("progan", "ghost", None), ("dcgan", "ghost", "biased"),
    ("dcgan", "auto", "unknown"),
])
def test_per_sample_gradients_match_a_per_example_loop(arch, engine, disc):
    extra = [] if arch == "dcgan" else ["model.fmap_base=64", "model.fmap_max=8", "train.r1_gamma=0",
                                        "train.loss=nonsaturating"]
    cfg = _cfg(f"model.arch={arch}", *extra)
    D = {"biased": _BiasedD, "unknown": lambda: nn.Sequential(_Scaled(), _BiasedD())}[disc]() if disc else None
    trainer = GANTrainer(cfg, device="cpu", discriminator=D)
    real = trainer.prepare_real(torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    fake = trainer.generate(2)[0].detach()
    eng = make_engine(trainer, engine)
    assert eng.name == ("vmap" if disc == "unknown" else engine)
    params = [p for p in trainer.D.parameters() if p.requires_grad]
    norms = [torch.sqrt(sum(g.square().sum() for g in _grads(trainer.d_real_loss(trainer.D, real[i:i + 1])[0], params)))
             .item() for i in range(3)]
    # One clipping norm between the per-sample norms, so that some samples are clipped and some are not.
    clip = sorted(norms)[1]
    grads, _ = eng.gradients(trainer, real, fake, clip, 5.0)
    expected = _reference(trainer, real, fake, clip, 5.0)
    for p, ref in zip(params, expected):
        torch.testing.assert_close(grads.get(p, torch.zeros_like(p)), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("engine,disc", [("ghost", None), ("vmap", None), ("loop", None), ("ghost", "biased")])
def test_generated_samples_clipped_per_sample_when_asked(engine, disc):
    trainer = GANTrainer(_cfg(), device="cpu", discriminator=_BiasedD() if disc else None)
    real = trainer.prepare_real(torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    fake = trainer.generate(3)[0].detach()
    params = [p for p in trainer.D.parameters() if p.requires_grad]
    fake_norms = sorted(torch.sqrt(sum(g.square().sum() for g in _grads(trainer.d_fake_loss(trainer.D, fake[j:j + 1])[0],
                                                                           params))).item() for j in range(3))
    fake_clip = fake_norms[1]  # between the per-sample norms: one generated sample unclipped, others clipped
    grads, _ = make_engine(trainer, engine).gradients(trainer, real, fake, 0.5, 4.0, fake_clip=fake_clip)
    expected = _reference(trainer, real, fake, 0.5, 4.0, fake_clip=fake_clip)
    unclipped = _reference(trainer, real, fake, 0.5, 4.0)
    assert any(not torch.allclose(a, b) for a, b in zip(expected, unclipped))
    for p, ref in zip(params, expected):
        torch.testing.assert_close(grads.get(p, torch.zeros_like(p)), ref, rtol=1e-4, atol=1e-6)


def test_noise_std_is_sigma_clip_over_expected_batch():
    trainer = GANTrainer(_cfg(), device="cpu")
    sigma, clip, expected = 1.3, 0.7, 16
    session = _session(trainer, sigma, clip, expected)

    class Zero:  # zero gradient inputs: what reaches the optimizer is the noise alone
        name = "zero"

        def gradients(self, trainer, real, fake, clip, expected, fake_clip=None, real_c=None, fake_c=None):
            return {}, torch.zeros(())

    session.update.engine = Zero()
    draws = []
    for _ in range(4):
        trainer.d_update.step(trainer, torch.zeros(0, 1, SIZE, SIZE), torch.zeros(1, 1, SIZE, SIZE))
        draws.append(torch.cat([p.grad.flatten() for p in trainer.D.parameters()]))
    noise = torch.cat(draws)
    assert noise.numel() > 20000
    assert noise.std().item() == pytest.approx(sigma * clip / expected, rel=0.05)
    assert abs(noise.mean().item()) < 0.05 * sigma * clip / expected
    assert not torch.equal(draws[0], draws[1])  # fresh noise every step
    assert session.steps == 4


def test_private_step_without_noise_or_clipping_equals_the_plain_step():
    cfg = _cfg()
    plain, private = GANTrainer(cfg, device="cpu"), GANTrainer(cfg, device="cpu")
    for t in (plain, private):
        t.opt_d = torch.optim.SGD(t.D.parameters(), lr=0.5)  # SGD: the weights show the gradient itself
    session = _session(private, sigma=0.0, clip=1e9, expected=8)
    real = torch.rand(8, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) * 2 - 1
    fake = plain.generate(8)[0].detach()
    DiscriminatorUpdate().step(plain, real, fake)
    private.d_update.step(private, real, fake)
    before = GANTrainer(cfg, device="cpu").D.state_dict()
    for (name, a), b in zip(plain.D.state_dict().items(), private.D.state_dict().values()):
        assert not torch.equal(a, before[name]) or a.dtype != torch.float32  # the step did change D
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert session.steps == 1


def test_private_training_runs_in_float32_even_where_bf16_is_the_default():
    cfg = _cfg("train.amp=bf16", "privacy.dp=true", "privacy.target_epsilon=3")
    trainer = GANTrainer(cfg, device="cpu")
    assert trainer.autocast_dtype == torch.bfloat16
    session = enable_dp_from(cfg, trainer, _images(), None, planned_steps=20, seed=5)
    assert trainer.autocast_dtype is None
    trainer.train_step(session.next_real)
    assert session.steps == 1


def test_every_private_step_is_accounted_and_the_generator_step_is_not_private():
    cfg = _cfg("train.d_steps_per_g=2", "privacy.dp=true", "privacy.target_epsilon=3")
    trainer = GANTrainer(cfg, device="cpu")
    session = enable_dp_from(cfg, trainer, _images(), np.array([f"p{i // 2}" for i in range(60)]),
                             planned_steps=20, seed=5)
    calls = []
    engine_gradients = session.update.engine.gradients
    session.update.engine.gradients = lambda *a, **k: calls.append(1) or engine_gradients(*a, **k)
    for _ in range(3):
        stats = trainer.train_step(session.next_real)
    assert trainer.d_step == 6 == session.steps == session.update.private_steps == len(calls)
    assert session.accountant.history == [(session.noise_multiplier, session.sample_rate, 6)]
    assert "d_real" not in stats and "d_loss" not in stats  # statistics of the private batch stay unreleased
    assert session.unit == "patient" and session.units == 30
    assert session.sample_rate == pytest.approx(8 / 30)
    eps = session.epsilon()
    # Replace-one (reported) is the stronger relation: it lies above the add/remove figure beside it.
    assert 0 < eps["add_remove"] == max(eps["rdp"], eps["prv"]) < eps["reported"] == eps["replace_one"] <= 3
    assert session.metrics() == {"epsilon": eps["reported"], "epsilon_add_remove": eps["add_remove"]}


def _two_private_steps(cfg):
    """(images, patients, trainer, session) after two private steps of a fixed-seed session."""
    images, patients = _images(), np.array([f"p{i // 3}" for i in range(60)])
    trainer = GANTrainer(cfg, device="cpu")
    session = enable_dp_from(cfg, trainer, images, patients, planned_steps=10, seed=11)
    for _ in range(2):
        trainer.train_step(session.next_real)
    return images, patients, trainer, session


@pytest.mark.slow
def test_state_survives_a_json_round_trip_and_resumes_exactly():
    cfg = _cfg("privacy.dp=true", "privacy.target_epsilon=3")
    images, patients, trainer, session = _two_private_steps(cfg)
    state = json.loads(json.dumps(session.state_dict()))
    saved = copy.deepcopy(trainer.state_dict())  # as a checkpoint would freeze it
    trainer.train_step(session.next_real)
    continued = trainer.model_state(("D",))

    again = GANTrainer(cfg, device="cpu")
    again.load_state_dict(saved)
    resumed = enable_dp_from(cfg, again, images, patients, state=state)  # another secret seed: ignored
    assert resumed.steps == 2 and resumed.noise_multiplier == session.noise_multiplier
    assert resumed.epsilon() == PrivacyAccountant.from_state_dict(state["accountant"]).epsilon()
    again.train_step(resumed.next_real)
    for key, value in again.model_state(("D",)).items():
        torch.testing.assert_close(value, continued[key], rtol=0, atol=0)
    assert resumed.steps == session.steps == 3


def test_a_hospital_refuses_to_train_past_its_budget():
    cfg = _cfg("privacy.dp=true", "privacy.target_epsilon=1")
    trainer = GANTrainer(cfg, device="cpu")
    session = enable_dp_from(cfg, trainer, _images(), None, planned_steps=3, seed=1)
    for _ in range(3):
        trainer.train_step(session.next_real)
    assert session.epsilon()["reported"] <= 1.0
    weights = trainer.model_state(("D",))
    with pytest.raises(BudgetExceeded, match="target 1"):
        trainer.train_step(session.next_real)
    assert session.steps == 3
    for key, value in trainer.model_state(("D",)).items():
        assert torch.equal(value, weights[key])


def test_an_empty_poisson_batch_is_still_a_noised_counted_step():
    trainer = GANTrainer(_cfg(), device="cpu")
    session = _session(trainer, sigma=1.0, clip=1.0)
    weights = trainer.model_state(("D",))
    stats = trainer.train_step(lambda: torch.zeros(0, 1, SIZE, SIZE))
    # images_seen counts the configured batch, a public figure, never the realised Poisson batch size
    assert session.steps == 1 and trainer.images_seen == trainer.cfg.train.batch_size
    assert math.isfinite(stats["d_fake"])
    assert any(not torch.equal(v, weights[k]) for k, v in trainer.model_state(("D",)).items())


def test_poisson_patient_sampling():
    patients = np.array([f"p{i % 50}" for i in range(150)])  # 50 patients, 3 images each, interleaved
    sampler = PoissonUnitSampler(_images(150), patients, 10, "patient", seed=7)
    assert sampler.units == 50 and sampler.sample_rate == pytest.approx(0.2)
    sizes = []
    for t in range(400):
        idx = sampler.indices(t)
        assert len(set(patients[idx])) == len(idx)  # at most one image per patient
        sizes.append(len(idx))
    assert np.mean(sizes) == pytest.approx(10, rel=0.05)
    assert np.var(sizes) == pytest.approx(50 * 0.2 * 0.8, rel=0.2)  # binomial, not a fixed batch
    assert 0 in [len(PoissonUnitSampler(_images(150), patients, 1, "patient", seed=7).indices(t)) for t in range(50)]
    batch = sampler()
    assert batch.dtype == torch.float32 and batch.shape[1:] == (1, SIZE, SIZE)
    assert -1 <= batch.min() and batch.max() <= 1


def test_privacy_unit():
    assert privacy_unit("auto", 6, np.array(["a", "a", "b", "c", "c", "c"])) == ("patient", 3)
    assert privacy_unit("auto", 3, np.array(["a", "b", "c"])) == ("image", 3)  # one image each: same thing
    assert privacy_unit("auto", 3, None) == ("image", 3)
    assert privacy_unit("image", 6, np.array(["a"] * 6)) == ("image", 6)
    cfg = _cfg("privacy.dp=true", "privacy.unit=patient")
    with pytest.raises(UserError, match="no patient ids"):
        enable_dp_from(cfg, GANTrainer(cfg, device="cpu"), _images(), None, planned_steps=5)


@pytest.mark.parametrize("overrides,message", [
    (["model.dp_compatible=false"], r"layer 'main\.3' \(BatchNorm2d\)"),
    (["model.arch=progan", "model.dp_compatible=false", "model.fmap_base=64", "model.fmap_max=8",
      "train.loss=hinge"], "mixes the samples"),
    (["model.arch=stylegan2", "model.fmap_base=64", "model.fmap_max=8"], "train.r1_gamma=0"),
    (["train.batch_size=100"], "above 1"),
])
def test_bad_models_and_settings_are_one_line_errors(overrides, message):
    cfg = _cfg("privacy.dp=true", *overrides)
    with pytest.raises(UserError, match=message) as err:
        enable_dp_from(cfg, GANTrainer(cfg, device="cpu"), _images(), None, planned_steps=5)
    assert "\n" not in str(err.value)


def test_wgan_gp_needs_the_loop_engine():
    trainer = GANTrainer(_cfg("train.loss=wgan-gp"), device="cpu")
    with pytest.raises(UserError, match="double backward"):
        make_engine(trainer, "ghost")
    session = _session(trainer, sigma=1.0, clip=1.0)
    assert session.engine == "loop"
    stats = trainer.train_step(lambda: torch.rand(4, 1, SIZE, SIZE) * 2 - 1)
    assert session.steps == 1 and math.isfinite(stats["d_fake"])


def test_private_centralized_run_through_the_cli_logs_epsilon_within_target(tmp_path, medsyngan_cache):
    from medsyngan.cli import app
    from typer.testing import CliRunner

    sets = ["model.arch=dcgan", f"model.resolution={SIZE}", f"data.size={SIZE}", "model.ngf=8", "model.ndf=8",
            "model.dp_compatible=true", "train.batch_size=8", "model.z_dim=16", "privacy.dp=true",
            "privacy.target_epsilon=2", "data.phantom_patients=40", "data.phantom_images_per_patient=2",
            "train.log_every=1"]
    args = ["train", "--config", "dcgan64", "--out", str(tmp_path / "run"), "--steps", "3"]
    for item in sets:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    eps = [r["epsilon"] for r in rows]
    assert len(eps) == 3 and eps == sorted(eps) and 0 < eps[-1] <= 2.0


def test_private_steps_train_only_the_unfrozen_head():
    cfg = _cfg("train.d_trainable_last=1", "privacy.dp=true", "privacy.target_epsilon=3")
    trainer = GANTrainer(cfg, device="cpu")
    before = {k: v.clone() for k, v in trainer.D.state_dict().items()}
    session = enable_dp_from(cfg, trainer, _images(), np.array([f"p{i // 2}" for i in range(60)]),
                             planned_steps=20, seed=5)
    for _ in range(2):
        trainer.train_step(session.next_real)
    moved = [k for k, v in unwrap(trainer.D).state_dict().items() if not torch.equal(before[k], v)]
    head = [n for n, m in unwrap(trainer.D).named_modules() if isinstance(m, nn.Conv2d)][-1] + ".weight"
    assert moved == [head] and session.steps == 2


def test_a_dp_state_of_the_earlier_format_resumes_with_fresh_noise():
    """A centralized checkpoint written before the ledger (state version 1: no noise counter, the planned release
    charged up front) resumes where it stopped: its next noise stream is the one after its last step."""
    cfg = _cfg("privacy.dp=true", "privacy.target_epsilon=3")
    images, patients, _, session = _two_private_steps(cfg)
    old = {k: v for k, v in session.state_dict().items() if k not in ("noise_draws", "releases")}
    old["version"] = 1
    resumed = enable_dp_from(cfg, GANTrainer(cfg, device="cpu"), images, patients, state=json.loads(json.dumps(old)))
    assert (resumed.steps, resumed.noise_draws, resumed.releases) == (2, 2, 0)
    with pytest.raises(UserError, match="DP state has version 7"):
        enable_dp_from(cfg, GANTrainer(cfg, device="cpu"), images, patients, state={**old, "version": 7})
