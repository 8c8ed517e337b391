"""Detectability (classifier two-sample test): chance for one distribution, certain for obviously different ones."""

from __future__ import annotations

import numpy as np
import pytest

from medsyngan.errors import UserError
from medsyngan.metrics.detectability import _halves, two_sample_test


def films(count: int, seed: int, square: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(110, 30, (count, 32, 32))
    if square:
        x[:, 10:22, 10:22] += 80
    return x.clip(0, 255).astype(np.uint8)


def test_two_samples_of_one_distribution_are_indistinguishable():
    patients = np.repeat(np.arange(60), 2)
    result = two_sample_test(films(120, 0), films(150, 1), patients, seed=0)
    assert result.films == 120 and set(result.values()) == {"c2st_auroc120_32", "c2st_auroc120_32_lo",
                                                            "c2st_auroc120_32_hi"}
    assert 0.35 < result.auroc.value < 0.65 and result.auroc.lo < 0.5 < result.auroc.hi
    assert len(result.real_index) == len(result.fake_index) == 120


def test_the_real_halves_keep_each_patient_on_one_side():
    patients = np.repeat(np.arange(30), np.arange(30) % 4 + 1)
    fold = _halves(patients, np.random.default_rng(0))
    assert all(len(set(fold[patients == p])) == 1 for p in range(30))
    assert abs(fold.sum() - len(patients) / 2) <= 4  # whole patients: within one patient's films of half


def test_obviously_different_samples_are_told_apart():
    result = two_sample_test(films(100, 0), films(100, 1, square=True), seed=0)
    assert result.auroc.value > 0.95 and result.auroc.lo > 0.9
    assert result.fake_scores.mean() > result.real_scores.mean()


def test_the_test_is_deterministic_and_needs_a_few_films():
    a = two_sample_test(films(40, 0), films(40, 2), seed=3)
    b = two_sample_test(films(40, 0), films(40, 2), seed=3)
    assert a.values() == b.values()
    with pytest.raises(UserError, match="at least 8 real and 8 synthetic films; got 5 and 40"):
        two_sample_test(films(5, 0), films(40, 1))
