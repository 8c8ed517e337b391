"""Re-identification audit: a verifier trained on other patients flags copies and follow-up films of training
patients, not strangers; it refuses training patients among its own; it is trained once per data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsyngan.errors import UserError
from medsyngan.metrics import reidentification as R

TOY = R.VerifierSettings(width=8, embedding=32, steps=200, patients=16, shift=1.0)


def patient_films(patients: int, films: int, seed: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Each patient an anatomy (a smooth random field), each film it with fresh noise and a small shift."""
    gen = torch.Generator().manual_seed(seed)
    anatomy = F.interpolate(torch.randn(patients, 1, 4, 4, generator=gen), size=(32, 32), mode="bicubic")
    ids = np.repeat([f"s{seed}-{i}" for i in range(patients)], films)
    return film(anatomy.repeat_interleave(films, 0), gen), ids, anatomy


def film(anatomy: torch.Tensor, gen: torch.Generator) -> np.ndarray:
    shifted = torch.stack([torch.roll(a, tuple(torch.randint(-1, 2, (2,), generator=gen).tolist()), (1, 2))
                           for a in anatomy])
    x = 128 + 40 * shifted + 8 * torch.randn(shifted.shape, generator=gen)
    return x.clamp(0, 255).to(torch.uint8)[:, 0].numpy()


@pytest.fixture(scope="module")
def sets():
    public, public_ids, _ = patient_films(30, 3, seed=1)
    real, real_ids, _ = patient_films(48, 2, seed=2)
    train, train_ids, anatomy = patient_films(10, 2, seed=3)
    stranger, _, _ = patient_films(1, 1, seed=4)
    follow_up = film(anatomy[3:4], torch.Generator().manual_seed(9))  # a new film of training patient 3
    fake = np.concatenate([train[5:6], follow_up, stranger])
    return dict(fake=fake, train=train, train_patients=train_ids, real=real, real_patients=real_ids,
                verifier_images=public, verifier_patients=public_ids)


def test_copies_and_follow_ups_of_training_patients_verify_strangers_do_not(sets, medsyngan_cache):
    result = R.reidentification_audit(**sets, settings=TOY, seed=0)
    assert result.verifier_auc > 0.95
    assert result.calibration_pairs >= 1000 and result.calibration_rate <= 1e-3
    flagged = result.synthetic_scores > result.threshold
    assert list(flagged) == [True, True, False]
    assert result.synthetic_scores[0] == pytest.approx(1.0, abs=1e-5) and result.synthetic_match[0] == 5
    assert sets["train_patients"][result.synthetic_match[1]] == sets["train_patients"][6]  # patient 3's film
    assert result.holdout_rate < 0.05  # real strangers rarely verify as a training patient
    assert [m.synthetic for m in result.worst] == [0, 1, 2] and result.worst[0].patient == sets["train_patients"][5]
    values = result.values("1e-3")
    assert values["reid_synth_rate_fmr1e-3"] == pytest.approx(2 / 3) and values["reid_synth_max_score"] > 0.99999
    assert result.verifier_patients == 30 + 24 and result.audit_patients == 24


def test_the_verifier_is_trained_once_per_data(sets, medsyngan_cache, monkeypatch):
    R.reidentification_audit(**sets, settings=TOY, seed=0)
    monkeypatch.setattr(R, "train_verifier", lambda *a: pytest.fail("the verifier was trained again"))
    again = R.reidentification_audit(**{**sets, "fake": sets["fake"][::-1].copy()}, settings=TOY, seed=0)
    assert list(again.synthetic_scores > again.threshold) == [False, True, True]


def test_training_patients_among_the_verifiers_or_held_out_ones_are_refused(sets):
    leaked = np.r_[sets["verifier_patients"][:-1], sets["train_patients"][:1]]
    with pytest.raises(UserError, match="1 verifier patients .* are training patients"):
        R.reidentification_audit(**{**sets, "verifier_patients": leaked}, settings=TOY)
    with pytest.raises(UserError, match="held-out real patients"):
        shared = np.r_[sets["train_patients"][:2], sets["real_patients"][2:]]
        R.reidentification_audit(**{**sets, "real_patients": shared}, settings=TOY)


def test_calibration_needs_enough_pairs(sets, medsyngan_cache):
    few = {**sets, "real": sets["real"][:20], "real_patients": sets["real_patients"][:20]}
    with pytest.raises(UserError, match="needs 1000 pairs of films of different held-out patients"):
        R.reidentification_audit(**few, settings=TOY)


def test_the_verifier_is_a_function_of_its_films_and_seed(sets):
    quick = R.VerifierSettings(width=4, embedding=8, steps=10, patients=8)
    films, ids = sets["verifier_images"], sets["verifier_patients"]
    a, b = (R.train_verifier(films, ids, quick, seed=1) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = R.train_verifier(films, ids, quick, seed=2)
    assert not torch.equal(a.net.head.weight, c.net.head.weight)
    with pytest.raises(UserError, match="at least 2 patients with 2 or more films; it has 1"):
        R.train_verifier(films[:4], ids[:4], quick, seed=1)
