"""Membership inference beside a reference generator that never saw the members: leakage shows as a gap between
the two AUCs, distribution shift between members and holdout as a high AUC for both."""

from __future__ import annotations

import numpy as np
import pytest

from medsyngan.errors import UserError
from medsyngan.metrics.context import MetricContext
from medsyngan.metrics.registry import METRICS


def films(count: int, seed: int, brightness: float = 110) -> np.ndarray:
    return np.random.default_rng(seed).normal(brightness, 30, (count, 32, 32)).clip(0, 255).astype(np.uint8)


def attack(fake: np.ndarray, reference: np.ndarray, train: np.ndarray, holdout: np.ndarray) -> dict[str, float]:
    ctx = MetricContext(fake, holdout, train, reference_fake=reference)
    result = METRICS["privacy"](ctx)
    assert [a.name for a in result.detail.attacks] == ["ganleaks_pixel", "ganleaks_pixel_reference"]
    return result.values


def test_copies_of_members_leak_and_the_reference_shows_they_do(medsyngan_cache):
    train, holdout = films(40, 0), films(40, 1)
    values = attack(fake=train.copy(), reference=films(40, 2), train=train, holdout=holdout)
    assert values["mia_ganleaks_pixel_auc"] == 1.0
    assert 0.3 < values["mia_ganleaks_pixel_auc_reference"] < 0.7


def test_distribution_shift_reaches_the_reference_too(medsyngan_cache):
    # members bright, holdout dark: any generator of bright films "finds" the members without having seen them
    train, holdout = films(40, 0, brightness=150), films(40, 1, brightness=70)
    values = attack(fake=films(40, 2, brightness=150), reference=films(40, 3, brightness=150), train=train,
                    holdout=holdout)
    assert values["mia_ganleaks_pixel_auc"] > 0.95 and values["mia_ganleaks_pixel_auc_reference"] > 0.95


def test_the_reference_is_optional_and_at_the_same_resolution(medsyngan_cache):
    train, holdout = films(10, 0), films(10, 1)
    plain = METRICS["privacy"](MetricContext(films(10, 2), holdout, train))
    assert "mia_ganleaks_pixel_auc_reference" not in plain.values
    with pytest.raises(UserError, match="differ in resolution"):
        MetricContext(films(10, 2), holdout, train, reference_fake=films(10, 3)[:, ::2, ::2])
