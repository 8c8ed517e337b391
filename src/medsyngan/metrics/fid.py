"""Fréchet distance (FID when the features are Inception's) and kernel inception distance (KID)."""

from __future__ import annotations

import numpy as np

from medsyngan.errors import UserError

MIN_FD_IMAGES = 2
MIN_KID_IMAGES = 2


def mean_cov(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), in float64.

    tr((Σ1 Σ2)^½) is computed as Σ √λ of the symmetric PSD matrix Σ1^½ Σ2 Σ1^½, which has the same
    eigenvalues as Σ1 Σ2; unlike scipy's sqrtm of the non-symmetric product this never returns complex
    parts, and negative round-off eigenvalues are clipped at zero.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise UserError(f"feature dimensions differ ({mu1.shape} vs {mu2.shape}); use one extractor for both sets")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fd_from_features(a: np.ndarray, b: np.ndarray) -> float:
    for name, f in (("first", a), ("second", b)):
        if len(f) < MIN_FD_IMAGES:
            raise UserError(f"Fréchet distance needs at least {MIN_FD_IMAGES} images per set; the {name} has {len(f)}")
    return frechet_distance(*mean_cov(a), *mean_cov(b))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (xᵀy / d + 1)³, the kernel of Bińkowski et al. (2018)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² of two samples (diagonals of the within-set kernels excluded)."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * kxy.mean()
    )


def kid(
    real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: mean and standard deviation of the unbiased MMD² over ``subsets`` random subsets of
    ``min(subset_size, len(real), len(fake))`` images drawn without replacement from each set."""
    m = min(subset_size, len(real), len(fake))
    if m < MIN_KID_IMAGES:
        raise UserError(f"KID needs at least {MIN_KID_IMAGES} images per set; got {len(real)} real and {len(fake)} fake")
    rng = np.random.default_rng(seed)
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    values = [
        mmd2_unbiased(real[rng.choice(len(real), m, replace=False)], fake[rng.choice(len(fake), m, replace=False)])
        for _ in range(subsets)
    ]
    return float(np.mean(values)), float(np.std(values))
