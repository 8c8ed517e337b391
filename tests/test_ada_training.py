"""Discriminator augmentation in the trainer: configuration, where D sees augmented images, p tuned from r_t, exact
resume, and per-sample augmentation under DP-SGD (fixed p only)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from medsyngan.config import load_config
from medsyngan.errors import UserError
from medsyngan.privacy.engines import make_engine
from medsyngan.training.ada import AugmentPipe, DiffAugment
from medsyngan.training.checkpoint import load_checkpoint, restore_trainer, save_trainer_checkpoint
from medsyngan.training.step import AUG_FAKE, AUG_G, AUG_R1, AUG_REAL, GANTrainer
from tiny_dp import enable_dp_from, random_images, tiny_cfg

RUN = ["run.device=cpu", "train.amp=off", "model.ngf=8", "model.ndf=8", "model.z_dim=16", "model.resolution=32",
       "data.size=32", "train.batch_size=8"]
ADA = ["train.augment=ada", "train.ada_interval=3", "train.ada_kimg=0.1"]


def cfg_with(*overrides: str):
    return load_config("dcgan64", RUN + list(overrides))


def batches(n: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return lambda: torch.rand(n, 1, 32, 32, generator=gen) * 2 - 1


class Shifted(nn.Module):
    """D with a constant added to its logits: a D that is sure every image is real (shift > 0) or fake."""

    def __init__(self, D: nn.Module, shift: float):
        super().__init__()
        self.inner, self.shift = D, shift

    def forward(self, x, *args):
        return self.inner(x, *args) + self.shift


# --- configuration ------------------------------------------------------------------------------------------------


def test_augmentation_is_off_by_default_and_adds_no_state():
    trainer = GANTrainer(cfg_with())
    assert trainer.augment is None and trainer.ada is None
    stats = trainer.train_step(batches())
    assert "augment_p" not in stats and "ada" not in trainer.state_dict()


def test_the_configuration_chooses_the_pipe_and_whether_p_adapts():
    ada = GANTrainer(cfg_with(*ADA, "train.augment_p=0.1"))
    assert isinstance(ada.augment, AugmentPipe) and ada.augment.p == 0.1 and ada.ada.p == 0.1
    assert not ada.augment.xflip and GANTrainer(cfg_with(*ADA, "train.augment_xflip=true")).augment.xflip
    fixed = GANTrainer(cfg_with("train.augment=ada", "train.ada_target=0", "train.augment_p=0.3"))
    assert fixed.ada is None and fixed.augment.p == 0.3
    diff = GANTrainer(cfg_with("train.augment=diffaugment", "train.augment_p=1"))
    assert isinstance(diff.augment, DiffAugment) and diff.ada is None


@pytest.mark.parametrize("overrides, message", [
    (["train.augment=diffaugment"], "augments nothing; set train.augment_p"),
    (["train.augment=ada", "train.augment_p=1"], "at most 0.99"),
    (["train.augment=ada", "privacy.dp=true"], "refused with privacy.dp; set train.ada_target=0 and a fixed"),
    (["train.augment=ada", "federated.enabled=true"], "refused with federated runs; set train.ada_target=0"),
])
def test_bad_augmentation_settings_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message) as err:
        cfg_with(*overrides)
    assert "\n" not in str(err.value)


def test_a_fixed_p_is_accepted_under_dp_and_in_federated_runs():
    cfg = cfg_with("train.augment=ada", "train.ada_target=0", "train.augment_p=0.2", "privacy.dp=true",
                   "federated.enabled=true")
    assert cfg.train.augment_p == 0.2


# --- where D sees augmented images -----------------------------------------------------------------------------


def test_every_image_d_sees_is_augmented_in_the_d_step_and_the_g_step(monkeypatch):
    trainer = GANTrainer(cfg_with("train.augment=ada", "train.ada_target=0", "train.augment_p=0.5"))
    roles, d_inputs = [], []
    original = trainer.augmented

    def recording(x, role):
        out = original(x, role)
        roles.append((role, out))
        return out

    monkeypatch.setattr(trainer, "augmented", recording)
    D = trainer.D
    hook = D.register_forward_pre_hook(lambda module, args: d_inputs.append(args[0]))
    trainer.train_step(batches())
    hook.remove()
    assert [r for r, _ in roles] == [AUG_REAL, AUG_FAKE, AUG_G]
    # The D step feeds both augmented batches to D, the G step the augmented generated batch.
    assert [id(x) for x in d_inputs] == [id(out) for _, out in roles]
    real_out = roles[0][1]
    assert real_out.shape == (8, 1, 32, 32) and not torch.equal(real_out, batches()())


def test_p_zero_leaves_the_images_untouched():
    trainer = GANTrainer(cfg_with(*ADA))
    x = batches()()
    assert trainer.augmented(x, AUG_REAL) is x


def test_augmentation_is_drawn_per_d_step_and_role_without_touching_the_trainer_rng():
    trainer = GANTrainer(cfg_with("train.augment=ada", "train.ada_target=0", "train.augment_p=0.9"))
    x = batches()()
    rng = trainer.rng.get_state()
    a, again, other_role = (trainer.augmented(x, AUG_REAL), trainer.augmented(x, AUG_REAL),
                            trainer.augmented(x, AUG_FAKE))
    trainer.d_step += 1
    next_step = trainer.augmented(x, AUG_REAL)
    assert torch.equal(a, again) and not torch.equal(a, other_role) and not torch.equal(a, next_step)
    assert torch.equal(trainer.rng.get_state(), rng)


def test_r1_differentiates_d_of_the_augmented_image_with_respect_to_the_plain_one():
    trainer = GANTrainer(cfg_with("train.augment=ada", "train.ada_target=0", "train.augment_p=0.9",
                                  "train.r1_gamma=2", "train.r1_interval=1"))
    real = batches()()
    got = trainer.d_reg_loss(trainer.D, real)
    x = real.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(trainer.D(trainer.augmented(x, AUG_R1)).sum(), x)
    torch.testing.assert_close(got, grad.square().flatten(1).sum(1) * (2 / 2 * 1))
    plain = real.clone().requires_grad_(True)
    (unaugmented,) = torch.autograd.grad(trainer.D(plain).sum(), plain)
    assert not torch.allclose(grad, unaugmented)


# --- adaptive p -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift, start, expected", [(100.0, 0.0, 3 * 8 / 100), (-100.0, 0.5, 0.5 - 3 * 8 / 100)])
def test_p_follows_r_t_per_expected_batch_every_interval(shift, start, expected):
    trainer = GANTrainer(cfg_with(*ADA, f"train.augment_p={start}"))
    trainer.D = Shifted(trainer.D, shift)
    counts = []
    accumulate = trainer.ada.accumulate
    trainer.ada.accumulate = lambda s, n: counts.append(n) or accumulate(s, n)
    next_real = batches()
    stats = [trainer.train_step(next_real) for _ in range(3)]
    assert [s["augment_p"] for s in stats[:2]] == [start, start] and counts == [8, 8, 8]
    assert stats[2]["augment_p"] == pytest.approx(expected) and trainer.augment.p == pytest.approx(expected)
    assert stats[2]["ada_rt"] == (1.0 if shift > 0 else -1.0)


def test_ada_state_resumes_exactly_from_a_checkpoint(tmp_path):
    cfg = cfg_with(*ADA, "train.augment_p=0.2", "train.ema_kimg=0.05")
    trainer = GANTrainer(cfg)
    trainer.D = Shifted(trainer.D, 0.5)  # r_t above target: p moves every interval
    next_real = batches()
    for _ in range(4):  # one interval and a third: the checkpoint holds a partial interval
        trainer.train_step(next_real)
    assert trainer.augment.p != 0.2 and trainer.ada.state_dict()["batches"] == 1
    save_trainer_checkpoint(tmp_path, trainer, cfg)
    rest = [next_real() for _ in range(4)]
    resumed = GANTrainer(cfg)
    resumed.D = Shifted(resumed.D, 0.5)
    restore_trainer(resumed, load_checkpoint(tmp_path))
    assert resumed.augment.p == trainer.augment.p
    for trained in (trainer, resumed):
        replay = iter(copy.deepcopy(rest))
        for _ in range(4):
            trained.train_step(lambda: next(replay))
    assert resumed.ada.state_dict() == trainer.ada.state_dict()
    a, b = trainer.model_state(("G", "D", "G_ema")), resumed.model_state(("G", "D", "G_ema"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- DP ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["ghost", "vmap", "loop"])
def test_per_sample_gradients_with_augmentation_equal_the_one_sample_gradients(engine):
    """Augmentation before the engine keeps each real image's clipped gradient a function of that image alone:
    the batch's clipped sum is the sum of each image's clipped gradient computed alone, with its own draw."""
    trainer = GANTrainer(tiny_cfg("train.augment=ada", "train.ada_target=0", "train.augment_p=0.8"))
    eng = make_engine(trainer, engine)
    pipe = trainer.augment
    real, fake = batches(5)(), batches(4, seed=1)()
    draws = pipe.draw(5, torch.Generator().manual_seed(3))
    clip = 0.05  # well below the gradient norms: clipping acts on every sample

    def grads(x):
        g, _ = eng.gradients(trainer, x, fake, clip, 1.0)
        return [g[p].clone() for p in trainer.d_params]

    batch, fake_only = grads(pipe.apply(real, draws)), grads(real[:0])
    alone = [grads(pipe.apply(real[i:i + 1], draws[i:i + 1])) for i in range(5)]
    for k in range(len(batch)):
        summed = sum(single[k] - fake_only[k] for single in alone)
        torch.testing.assert_close(batch[k] - fake_only[k], summed, rtol=1e-4, atol=1e-6)
    assert any((b - f).abs().max() > 1e-4 for b, f in zip(batch, fake_only))


def test_a_dp_run_trains_with_a_fixed_p_and_the_engine_sees_the_augmented_reals(monkeypatch):
    cfg = tiny_cfg("train.augment=ada", "train.ada_target=0", "train.augment_p=0.5", "privacy.dp=true",
                   "privacy.target_epsilon=10")
    trainer = GANTrainer(cfg)
    session = enable_dp_from(cfg, trainer, random_images(), np.arange(60) // 2)
    seen, augmented = [], []
    original_augmented, original_gradients = trainer.augmented, session.update.engine.gradients
    monkeypatch.setattr(trainer, "augmented", lambda x, role: augmented.append(original_augmented(x, role))
                        or augmented[-1])
    monkeypatch.setattr(session.update.engine, "gradients",
                        lambda tr, real, *a, **k: seen.append(real) or original_gradients(tr, real, *a, **k))
    stats = trainer.train_step(session.next_real)
    assert seen[0] is augmented[0] and stats["augment_p"] == 0.5 and np.isfinite(stats["d_fake"])
    assert session.steps == 1


def test_adaptive_p_is_refused_by_the_dp_session():
    cfg = tiny_cfg(*ADA)
    trainer = GANTrainer(cfg)
    cfg = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"dp": True})})
    with pytest.raises(UserError, match="adaptive augmentation.*set train.ada_target=0 and a fixed"):
        enable_dp_from(cfg, trainer, random_images(), np.arange(60) // 2)


# --- the measurement's recipes ------------------------------------------------------------------------------------


def test_the_families_study_pairs_every_family_with_its_ada_row_at_one_budget(tmp_path):
    from pathlib import Path

    from medsyngan.training.schedule import GrowthSchedule, check_run_length
    from medsyngan.workflows.experiment import Workspace, load_experiment
    from medsyngan.workflows.recipes import planned_images

    exp = load_experiment(Path(__file__).resolve().parents[1] / "experiments" / "nih-64-families")
    budget = exp.study.budget
    # The centralized rows at the study's budget (the federated rows and the longer run: tests/test_study_families.py).
    central = [row for row in exp.study.rows if not row.startswith("fed-") and not exp.book[row].images_through_d]
    plans = {row: Workspace(exp, tmp_path, tmp_path / "data", budget).plan(row, 0).cfg for row in central}
    assert {cfg.model.arch for cfg in plans.values()} == {"dcgan", "progan", "stylegan2", "stylegan3"}
    augment_fields = ("augment", "ada_target", "ada_interval", "ada_kimg")
    for row, cfg in plans.items():
        assert planned_images(cfg) == budget.images_through_d and not cfg.federated.enabled, row
        if row.endswith("-ada"):
            plain = plans[row.removesuffix("-ada")]
            assert cfg.train.augment == "ada" and cfg.train.ada_target > 0 and plain.train.augment == "none"
            same = cfg.train.model_copy(update={k: getattr(plain.train, k) for k in augment_fields})
            assert cfg.model == plain.model and same == plain.train, row
    progan = plans["progan"]
    check_run_length(progan)  # the budget reaches the final resolution
    assert GrowthSchedule.of(progan).stage(budget.images_through_d) == (64, 1.0)


@pytest.mark.slow
def test_a_private_federation_trains_with_a_fixed_p(tmp_path, medsyngan_cache):
    """Every hospital builds its trainer from the configuration the server sends: one fixed p for all, under the
    product default's DP, 8-bit updates, encryption and secure aggregation."""
    from test_federated_simulation import _finish, _rows, _train, _until_none_left

    run = tmp_path / "fed"
    out = _finish(_train(run, "federated.rounds=2", "train.batch_size=4", "train.augment=ada", "train.ada_target=0",
                         "train.augment_p=0.3"))
    assert "Traceback" not in out and "round 2/2" in out
    _until_none_left(run, 0)
    rows = [r for r in _rows(run) if "hospital" in r]
    assert [r["round"] for r in rows] == [1, 2] and all(len(r["hospital"]) >= 2 for r in rows)
    assert load_config(run / "config.toml").train.augment_p == 0.3
