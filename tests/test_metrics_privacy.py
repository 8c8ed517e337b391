"""Privacy audit: ROC arithmetic against a brute-force count, the DP bound, and attacks that must succeed or fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsyngan.errors import UserError
from medsyngan.metrics import privacy_audit as pa


def test_auc_equals_mann_whitney_with_ties():
    rng = np.random.default_rng(0)
    m, n = rng.integers(0, 6, 40).astype(float), rng.integers(0, 5, 50).astype(float)
    brute = np.mean([[1.0 if a > b else 0.5 if a == b else 0.0 for b in n] for a in m])
    fpr, tpr = pa.roc_curve(m, n)
    assert pa.auc(fpr, tpr) == pytest.approx(brute)


def test_tpr_at_fpr_counts_thresholds_directly():
    members = np.array([10.0, 9, 8, 1])
    nonmembers = np.array([7.0, 2, 0.5, 0.4])
    fpr, tpr = pa.roc_curve(members, nonmembers)
    assert pa.tpr_at_fpr(fpr, tpr, 0.0) == 0.75  # three members above every non-member
    assert pa.tpr_at_fpr(fpr, tpr, 0.25) == 0.75
    assert pa.tpr_at_fpr(fpr, tpr, 0.5) == 1.0  # the last member sits above the two lowest non-members


def test_dp_bound():
    fpr = np.linspace(0, 1, 11)
    np.testing.assert_allclose(pa.dp_tpr_bound(fpr, 0.0, 0.0), fpr)  # ε = 0: no test beats chance
    assert pa.dp_auc_bound(0.0, 0.0) == pytest.approx(0.5, abs=1e-6)
    assert pa.dp_tpr_bound(0.01, 1.0, 1e-5) == pytest.approx(np.e * 0.01 + 1e-5)
    # pure ε-DP: the region's area has the closed form e^ε/(e^ε+1) (two lines meeting at FPR = 1/(e^ε+1))
    eps = 2.0
    assert pa.dp_auc_bound(eps, 0.0) == pytest.approx(np.exp(eps) / (np.exp(eps) + 1), abs=1e-6)


def test_ganleaks_finds_copies_and_not_strangers():
    rng = np.random.default_rng(1)
    members, nonmembers = rng.normal(size=(50, 20)), rng.normal(size=(50, 20))
    copies = pa.gan_leaks(members, nonmembers, generated=members + 1e-3 * rng.normal(size=members.shape))
    assert copies.auc == 1.0 and copies.tpr_at(1e-3) == 1.0
    fresh = pa.gan_leaks(members, nonmembers, generated=rng.normal(size=(200, 20)))
    assert 0.3 < fresh.auc < 0.7


def test_logan_uses_the_discriminator_score():
    members = np.full((10, 8, 8), 200, np.uint8)
    nonmembers = np.full((10, 8, 8), 20, np.uint8)
    D = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1))
    torch.nn.init.constant_(D[1].weight, 1.0)
    assert pa.logan(members, nonmembers, D).auc == 1.0
    with pytest.raises(UserError, match="at least 2"):
        pa.logan(members[:1], nonmembers, D)


def test_dcr_ratio():
    rng = np.random.default_rng(2)
    train = rng.normal(size=(100, 10))
    holdout = rng.normal(size=(50, 10))
    memorized = train[:50] + 0.01
    assert pa.dcr(memorized, holdout, train).ratio < 0.1
    assert 0.7 < pa.dcr(rng.normal(size=(50, 10)), holdout, train).ratio < 1.4
