"""FD, KID and the k-NN metrics against independent computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg

from medsyngan.errors import UserError
from medsyngan.metrics import fid, prdc


def _scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook computation (pytorch-fid's), in float64 with scipy's general sqrtm."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("dim,n", [(8, 200), (64, 300), (32, 20)])  # the last: rank-deficient covariances
def test_frechet_matches_scipy_float64(dim, n):
    rng = np.random.default_rng(dim)
    mix = rng.normal(size=(dim, dim))
    a = rng.normal(size=(n, dim)) @ mix
    b = rng.normal(size=(n, dim)) @ mix * 1.3 + 0.5
    ours, ref = fid.fd_from_features(a, b), _scipy_fd(a, b)
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-6)


def test_frechet_of_a_set_with_itself_is_zero():
    a = np.random.default_rng(0).normal(size=(100, 16))
    assert abs(fid.fd_from_features(a, a)) < 1e-8


def _direct_unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda u, v: (float(u @ v) / d + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_equals_direct_unbiased_mmd():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(25, 6)), rng.normal(0.3, 1.2, size=(25, 6))
    assert fid.mmd2_unbiased(x, y) == pytest.approx(_direct_unbiased_mmd2(x, y), rel=1e-10)
    # one subset holding every sample is the plain unbiased MMD²
    mean, std = fid.kid(x, y, subsets=3, subset_size=25)
    assert mean == pytest.approx(_direct_unbiased_mmd2(x, y), rel=1e-10) and std == pytest.approx(0, abs=1e-12)
    # subsets: the mean over subsets of the direct value on the same draws
    sub_mean, _ = fid.kid(x, y, subsets=4, subset_size=10, seed=7)
    rng = np.random.default_rng(7)
    direct = [
        _direct_unbiased_mmd2(x[rng.choice(25, 10, replace=False)], y[rng.choice(25, 10, replace=False)])
        for _ in range(4)
    ]
    assert sub_mean == pytest.approx(np.mean(direct), rel=1e-10)


def test_kid_and_fd_say_the_minimum():
    with pytest.raises(UserError, match="at least 2"):
        fid.kid(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(UserError, match="at least 2"):
        fid.fd_from_features(np.zeros((1, 4)), np.zeros((5, 4)))


def _brute_prdc(real, fake, k):
    def radius(s, i):
        return sorted(np.linalg.norm(s[i] - s[j]) for j in range(len(s)) if j != i)[k - 1]

    rr = [radius(real, i) for i in range(len(real))]
    rf = [radius(fake, j) for j in range(len(fake))]
    dist = lambda a, b: np.linalg.norm(a - b)  # noqa: E731
    precision = np.mean([any(dist(f, r) < rr[i] for i, r in enumerate(real)) for f in fake])
    recall = np.mean([any(dist(r, f) < rf[j] for j, f in enumerate(fake)) for r in real])
    density = np.mean([sum(dist(f, r) < rr[i] for i, r in enumerate(real)) for f in fake]) / k
    coverage = np.mean([min(dist(r, f) for f in fake) < rr[i] for i, r in enumerate(real)])
    return precision, recall, density, coverage


def test_prdc_matches_brute_force():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(40, 5)), rng.normal(0.5, 0.8, size=(35, 5))
    p, r, _, _ = _brute_prdc(real, fake, 3)
    _, _, d, c = _brute_prdc(real, fake, 5)
    assert prdc.precision_recall(real, fake, 3) == pytest.approx((p, r))
    assert prdc.density_coverage(real, fake, 5) == pytest.approx((d, c))
    with pytest.raises(UserError, match="at least 6"):
        prdc.density_coverage(real[:5], fake, 5)
