"""Precision and recall (Kynkäänniemi et al. 2019) and density and coverage (Naeem et al. 2020) in feature space.

A real image's k-NN radius is the distance to its k-th nearest other real image (likewise for fake images).
- precision: share of fake samples inside at least one real k-NN ball (fidelity);
- recall: share of real samples inside at least one fake k-NN ball (diversity);
- density: mean number of real balls that contain a fake sample, divided by k (can exceed 1);
- coverage: share of real samples whose ball contains at least one fake sample.
The paper defaults are k = 3 for precision/recall and k = 5 for density/coverage.
"""

from __future__ import annotations

import numpy as np
import torch

from medsyngan.errors import UserError


def _pairwise(a: np.ndarray, b: np.ndarray) -> torch.Tensor:
    return torch.cdist(torch.from_numpy(np.asarray(a, np.float64)), torch.from_numpy(np.asarray(b, np.float64)))


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    d = _pairwise(features, features)
    # the k+1-th smallest includes the point itself at distance 0
    return torch.kthvalue(d, k + 1, dim=1).values.numpy()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    _check(real, fake, k)
    r_real, r_fake = knn_radii(real, k), knn_radii(fake, k)
    d = _pairwise(real, fake).numpy()  # [real, fake]
    precision = (d < r_real[:, None]).any(axis=0).mean()
    recall = (d < r_fake[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> tuple[float, float]:
    _check(real, fake, k)
    r_real = knn_radii(real, k)
    d = _pairwise(real, fake).numpy()
    density = (d < r_real[:, None]).sum(axis=0).mean() / k
    coverage = (d.min(axis=1) < r_real).mean()
    return float(density), float(coverage)


def _check(real: np.ndarray, fake: np.ndarray, k: int) -> None:
    need = k + 1
    if len(real) < need or len(fake) < need:
        raise UserError(
            f"k-NN metrics with k={k} need at least {need} images per set; got {len(real)} real and {len(fake)} fake"
        )
