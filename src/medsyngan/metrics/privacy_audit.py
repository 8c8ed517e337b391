"""Privacy audit of released synthetic images: nearest-neighbour distances and membership inference.

- **Distance to closest record (DCR).** For every synthetic image, the distance to its nearest training image;
  compared with the same distance for real images the model never saw (a patient-disjoint holdout). The ratio
  median(synthetic→train) / median(holdout→train) is reported in pixel space (RMSE on [0, 1]) and in feature
  space. A ratio well below 1 means synthetic images sit closer to training images than fresh real images
  do — memorization.
- **Membership inference.** Members are training images, non-members holdout images; the attack must tell
  them apart. GAN-Leaks full black-box (Chen et al. 2020): score = −(distance to the nearest generated
  sample). LOGAN-style white-box (Hayes et al. 2019): score = the discriminator's logit. Reported: ROC AUC
  and TPR at 1% and 0.1% FPR (the low-FPR regime of Carlini et al. 2022).
- **What (ε, δ)-DP implies.** Any membership test against an (ε, δ)-DP mechanism has
  TPR ≤ min(e^ε·FPR + δ, 1 − e^−ε·(1 − δ − FPR)) (Kairouz et al. 2015); the AUC bound is the area under
  that curve. The bounds hold for the training algorithm's unit of privacy (a patient when the run used
  patient-level DP), so an attack at image level may sit anywhere below them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from medsyngan.errors import UserError

LOW_FPRS = (1e-2, 1e-3)


def nn_distances(query: np.ndarray, reference: np.ndarray, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query row to its nearest reference row, and that row's index."""
    q = torch.from_numpy(np.asarray(query, np.float64).reshape(len(query), -1))
    r = torch.from_numpy(np.asarray(reference, np.float64).reshape(len(reference), -1))
    dists, idx = [], []
    for s in range(0, len(q), block):
        d = torch.cdist(q[s : s + block], r)
        v, i = d.min(dim=1)
        dists.append(v)
        idx.append(i)
    return torch.cat(dists).numpy(), torch.cat(idx).numpy()


def pixel_vectors(images_u8: np.ndarray) -> np.ndarray:
    """Images as vectors scaled so that the Euclidean distance is the RMSE on [0, 1]."""
    x = np.asarray(images_u8, np.float64).reshape(len(images_u8), -1) / 255.0
    return x / np.sqrt(x.shape[1])


@dataclass
class DcrResult:
    synthetic_to_train: np.ndarray
    holdout_to_train: np.ndarray

    @property
    def ratio(self) -> float:
        return float(np.median(self.synthetic_to_train) / max(np.median(self.holdout_to_train), 1e-12))


def dcr(synthetic: np.ndarray, holdout: np.ndarray, train: np.ndarray) -> DcrResult:
    if min(len(synthetic), len(holdout), len(train)) < 1:
        raise UserError("the distance audit needs synthetic, holdout (--real) and training (--train) images")
    return DcrResult(nn_distances(synthetic, train)[0], nn_distances(holdout, train)[0])


def roc_curve(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and TPR at every threshold (higher score = 'member'), ties handled as one threshold."""
    scores = np.concatenate([member_scores, nonmember_scores])
    labels = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    tpr = np.r_[0.0, np.cumsum(labels)[last] / labels.sum()]
    fpr = np.r_[0.0, np.cumsum(1 - labels)[last] / (1 - labels).sum()]
    return fpr, tpr


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.trapezoid(tpr, fpr))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Highest TPR among thresholds whose FPR does not exceed ``target`` (no interpolation)."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


@dataclass
class AttackResult:
    name: str
    members: int
    nonmembers: int
    fpr: np.ndarray
    tpr: np.ndarray

    @property
    def auc(self) -> float:
        return auc(self.fpr, self.tpr)

    def tpr_at(self, target: float) -> float:
        return tpr_at_fpr(self.fpr, self.tpr, target)


@dataclass
class PrivacyAudit:
    """What the report draws: DCR distributions by space ('pixel' and the feature network's tag) and the ROC
    curves of the membership-inference attacks."""

    dcr: dict[str, DcrResult]
    attacks: list[AttackResult]


def _balanced(members: np.ndarray, nonmembers: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n = min(len(members), len(nonmembers))
    if n < 2:
        raise UserError(
            f"membership inference needs at least 2 training and 2 holdout images; got {len(members)} and {len(nonmembers)}"
        )
    rng = np.random.default_rng(seed)
    return rng.choice(len(members), n, replace=False), rng.choice(len(nonmembers), n, replace=False)


def gan_leaks(
    members: np.ndarray, nonmembers: np.ndarray, generated: np.ndarray, seed: int = 0
) -> AttackResult:
    """GAN-Leaks full black-box on vectors (pixels or features): score = −min distance to a generated sample."""
    mi, ni = _balanced(members, nonmembers, seed)
    sm = -nn_distances(np.asarray(members)[mi], generated)[0]
    sn = -nn_distances(np.asarray(nonmembers)[ni], generated)[0]
    return AttackResult("ganleaks", len(mi), len(ni), *roc_curve(sm, sn))


@torch.no_grad()
def logan(
    members_u8: np.ndarray, nonmembers_u8: np.ndarray, discriminator: torch.nn.Module, seed: int = 0,
    batch: int = 256, device: torch.device | str = "cpu",
) -> AttackResult:
    """LOGAN white-box: the discriminator's logit on the image (images fed in [-1, 1], shape [B, 1, S, S])."""
    mi, ni = _balanced(members_u8, nonmembers_u8, seed)
    discriminator = discriminator.eval().to(device)

    def score(images: np.ndarray) -> np.ndarray:
        out = []
        for s in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[s : s + batch])).float().to(device)[:, None] / 127.5 - 1
            out.append(discriminator(x).reshape(len(x), -1)[:, 0].double().cpu())
        return torch.cat(out).numpy()

    return AttackResult("logan", len(mi), len(ni), *roc_curve(score(np.asarray(members_u8)[mi]), score(np.asarray(nonmembers_u8)[ni])))


def dp_tpr_bound(fpr: np.ndarray | float, epsilon: float, delta: float) -> np.ndarray:
    """Largest TPR any membership test can reach at a given FPR against an (ε, δ)-DP mechanism."""
    fpr = np.asarray(fpr, np.float64)
    if math.isinf(epsilon):  # no guarantee (a clipping-only run): nothing bounds a test, and e^∞ · 0 is NaN
        return np.ones_like(fpr)
    a = np.exp(epsilon) * fpr + delta
    b = 1 - np.exp(-epsilon) * (1 - delta - fpr)
    return np.clip(np.minimum(a, b), 0.0, 1.0)


def dp_auc_bound(epsilon: float, delta: float, grid: int = 100_001) -> float:
    fpr = np.linspace(0.0, 1.0, grid)
    return float(np.trapezoid(dp_tpr_bound(fpr, epsilon, delta), fpr))
