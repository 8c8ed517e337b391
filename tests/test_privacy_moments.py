"""The private mean image (privacy.moments): the release's value, clipping and noise, its accounting inside the
DP session, a resume that never releases twice, and the generator-loss term."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medsyngan.errors import UserError
from medsyngan.privacy.moments import MeanImageRelease, lowres_mean, release_mean_image, unit_means
from medsyngan.training.step import GANTrainer
from tiny_dp import SIZE, enable_dp_from, random_images as _images, tiny_cfg as _cfg


def test_unit_means_average_each_patients_films_first():
    images = np.zeros((3, SIZE, SIZE), dtype=np.uint8)
    images[0], images[1], images[2] = 255, 0, 0  # patient a has two films (white, black), patient b one (black)
    means = unit_means(images, np.array(["a", "a", "b"]), 4)
    assert means.shape == (2, 4, 4)
    torch.testing.assert_close(means[0], torch.full((4, 4), 0.0))  # (1 + -1) / 2
    torch.testing.assert_close(means[1], torch.full((4, 4), -1.0))


def test_release_is_the_mean_of_clipped_deviations_plus_calibrated_noise():
    images, patients = _images(40), np.array([f"p{i // 2}" for i in range(40)])
    reference = torch.zeros(4, 4)
    means = unit_means(images, patients, 4)
    exact = release_mean_image(images, patients, 4, clip=100.0, noise_multiplier=0.0, reference=reference,
                               generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(exact, means.mean(0))
    # Replacing one unit by another, however far apart, moves the released sum by at most 2 · clip · k (and
    # nearly that for opposite extremes): the replace-one sensitivity the accountant charges for.
    white, black = (np.full((2, SIZE, SIZE), v, dtype=np.uint8) for v in (255, 0))
    sums = [release_mean_image(np.concatenate([images, x]), np.append(patients, ["x", "x"]), 4, 0.05, 0.0,
                               reference, torch.Generator().manual_seed(0)) * 21 for x in (white, black)]
    assert 1.9 * 0.05 * 4 <= (sums[0] - sums[1]).norm() <= 2 * 0.05 * 4 + 1e-5
    # Noise: N(0, (σ · clip · k)²) on the sum of 20 units, i.e. σ · clip · k / 20 on the mean.
    draws = torch.stack([release_mean_image(images, patients, 4, 100.0, 2.0, reference,
                                            torch.Generator().manual_seed(s)) - exact for s in range(200)])
    assert draws.std().item() == pytest.approx(2.0 * 100.0 * 4 / 20, rel=0.1)


def test_release_is_charged_when_made_and_a_resume_reuses_it():
    cfg = _cfg("privacy.dp=true", "privacy.target_epsilon=10", "privacy.mean_image_size=4",
               "privacy.mean_image_noise=2")
    images, patients = _images(), np.array([f"p{i // 2}" for i in range(60)])
    trainer = GANTrainer(cfg, device="cpu")
    session = enable_dp_from(cfg, trainer, images, patients, planned_steps=6, seed=5)
    written = []
    session.attach_ledger(lambda state: written.append(json.loads(json.dumps(state))), "ledger")
    assert session.accountant.history == [] and session.releases == 0
    stats = [trainer.train_step(session.next_real) for _ in range(3)]
    # The release was charged and written before it was computed, then written again with its target.
    at_release = next(w for w in written if w["releases"] == 1)
    assert at_release["mean_image"] is None and [2.0, 1.0, 1] in at_release["accountant"]["history"]
    assert written[-1]["mean_image"] is not None
    assert session.releases == 1 and session.steps == 3
    assert session.accountant.history.count((2.0, 1.0, 1)) == 1 and session.accountant.steps == 4
    assert session.steps_left() == 3  # the release does not eat into the calibrated plan
    assert all(np.isfinite(s["g_extra"]) for s in stats)
    assert session.epsilon()["reported"] <= 10.0
    state = json.loads(json.dumps(session.state_dict()))
    target = session.release.released.clone()

    again = GANTrainer(cfg, device="cpu")
    resumed = enable_dp_from(cfg, again, images, patients, state=state, seed=99)  # another secret: must not matter
    again.train_step(resumed.next_real)
    torch.testing.assert_close(resumed.release.released, target, rtol=0, atol=0)
    assert resumed.releases == 1 and resumed.steps == 4


def test_anchor_gradient_is_that_of_the_squared_mean_gap():
    target = torch.full((4, 4), 0.3)
    anchor = MeanImageRelease(_images(4), None, 4, 1.0, 1.0, weight=1.0, generator=torch.nn.Identity())
    anchor.released = target
    fake = torch.randn(8, 1, SIZE, SIZE, requires_grad=True)
    term, gap = anchor(fake)
    (grad,) = torch.autograd.grad(term, fake)
    squared = (lowres_mean(fake, 4) - target).square().sum()
    (expected,) = torch.autograd.grad(squared, fake)
    torch.testing.assert_close(grad, expected)
    assert gap.item() == pytest.approx(squared.item())

def test_anchor_rewards_shrinking_variety_a_tenth_as_much_as_the_squared_batch_mean():
    # A toy generator x = t + s·ε whose mean is already on target: any gradient on the spread s is a reward for
    # collapsing. Averaged over many batches, the squared batch mean pushes s down; the anchor only through the
    # current batch's weight in its running mean.
    target = torch.zeros(4, 4)
    anchor = MeanImageRelease(_images(4), None, 4, 1.0, 1.0, weight=1.0, generator=torch.nn.Identity())
    anchor.released = target
    gen = torch.Generator().manual_seed(0)
    spread = torch.tensor(1.0, requires_grad=True)
    naive, anchored = 0.0, 0.0
    for _ in range(2000):
        fake = spread * torch.randn(8, 1, SIZE, SIZE, generator=gen)
        naive += torch.autograd.grad((lowres_mean(fake, 4) - target).square().sum(), spread,
                                     retain_graph=True)[0].item()
        anchored += torch.autograd.grad(anchor(fake)[0], spread)[0].item()
    assert naive > 0 and 0 < anchored < 0.2 * naive


@pytest.mark.parametrize("overrides, message", [
    (["privacy.mean_image_size=8"], "is a DP release; set privacy.dp=true"),
    (["privacy.dp=true", f"privacy.mean_image_size={SIZE + 1}"], "exceeds model.resolution"),
])
def test_bad_mean_image_settings_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        _cfg(*overrides)
