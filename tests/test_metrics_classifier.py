"""The small CNN judge of metrics/classifier.py: it learns a visible difference with class-balanced batches, is a
function of its seed alone, and its AUROC is the pairwise probability with ties counting half."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from medsyngan.errors import UserError
from medsyngan.metrics.classifier import SmallCNN, accuracy, auroc, balanced_accuracy, train_classifier


def _films(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """16-px noise; a rare class (a quarter) has a bright top-left corner."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 4 == 0).astype(int)
    films = rng.integers(60, 120, (n, 16, 16)).astype(np.uint8)
    films[y == 1, :6, :6] = 240
    return films, y


def test_the_judge_learns_a_rare_class_and_depends_on_its_seed_alone():
    films, y = _films(80, 0)
    torch.manual_seed(123)
    a = train_classifier(films, y, 2, steps=40, batch_size=16, seed=4)
    torch.manual_seed(999)  # the caller's global RNG does not reach the judge
    b = train_classifier(films, y, 2, steps=40, batch_size=16, seed=4)
    held, y_held = _films(40, 1)
    probs = a.predict_proba(held)
    assert np.array_equal(probs, b.predict_proba(held))
    assert balanced_accuracy(probs, y_held) > 0.9 and auroc(probs[:, 1], y_held) > 0.95
    assert probs.shape == (40, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert SmallCNN(3)(torch.zeros(2, 1, 64, 64)).shape == (2, 3)
    with pytest.raises(UserError, match="at least two of its 2 classes"):
        train_classifier(films, np.zeros(80, int), 2, steps=1)


def test_auroc_is_the_pairwise_probability_with_ties_counting_half():
    rng = np.random.default_rng(0)
    scores, targets = rng.integers(0, 5, 40).astype(float), rng.random(40) < 0.4
    pairs = [1.0 if p > q else 0.5 if p == q else 0.0
             for p, q in itertools.product(scores[targets], scores[~targets])]
    assert auroc(scores, targets) == pytest.approx(np.mean(pairs))
    assert auroc(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0


def test_accuracies():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])
    targets = np.array([0, 0, 0, 1])
    assert accuracy(probs, targets) == 1.0 and balanced_accuracy(probs, targets) == 1.0
    assert balanced_accuracy(probs, np.array([0, 0, 1, 1])) == pytest.approx(0.75)
