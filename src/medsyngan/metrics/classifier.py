"""A small CNN classifier of chest films and its training loop: the judge of whether a conditional generator's
images show the label they were asked for, and a building block for utility metrics (train on synthetic, test on
real).

The network (:class:`SmallCNN`): four blocks of a 3x3 convolution with stride 2, GroupNorm and LeakyReLU(0.2)
(16, 32, 64, 128 channels: a 64-px film ends at 4x4), global average pooling, dropout and one linear layer to the
classes' logits; about 100 k parameters. Films are scaled to [-1, 1] as the GANs see them.

Training (:func:`train_classifier`): Adam (lr 1e-3, weight decay 1e-4) on cross-entropy, for a fixed number of steps
of class-balanced batches — every class equally likely in a batch, so a rare class (AP films, findings) is not
ignored — with small random shifts (up to 1/16 of the side) and brightness/contrast jitter of the films, which a
few hundred training films need against overfitting. Everything random comes from ``seed``.

Scores: :func:`accuracy`, :func:`balanced_accuracy` (mean of the per-class recalls: chance is 1/K whatever the
class sizes) and :func:`auroc` (two classes: the probability that a film of class 1 scores above one of class 0,
ties counting half — the Mann–Whitney statistic).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsyngan.errors import UserError


class SmallCNN(nn.Module):
    """(B, 1, S, S) in [-1, 1] → (B, classes) logits; S a multiple of 16."""

    WIDTHS = (16, 32, 64, 128)

    def __init__(self, classes: int, dropout: float = 0.3):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in self.WIDTHS:
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1), nn.GroupNorm(8, c_out), nn.LeakyReLU(0.2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(c_in, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(images, np.float32)).div_(127.5).sub_(1.0).unsqueeze(1)


def _jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random whole-pixel shifts (edges replicated) and brightness/contrast changes, per film."""
    n, _, s, _ = x.shape
    reach = max(1, s // 16)
    shift = torch.randint(-reach, reach + 1, (n, 2), generator=gen).float() * (2.0 / s)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    shifted = F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)
    contrast = 1.0 + 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    brightness = 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    return (shifted * contrast + brightness).clamp(-1.0, 1.0)


@dataclass
class Classifier:
    """A trained :class:`SmallCNN` and the number of its classes."""

    net: SmallCNN
    classes: int

    @torch.no_grad()
    def predict_proba(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(N, classes) class probabilities of uint8 films [N, S, S]."""
        self.net.eval()
        out = [F.softmax(self.net(_to_input(images[i:i + batch_size])), dim=1)
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.classes), np.float32)


def train_classifier(images: np.ndarray, targets: np.ndarray, classes: int, steps: int = 1500, batch_size: int = 64,
                     seed: int = 0, lr: float = 1e-3) -> Classifier:
    """Train a :class:`SmallCNN` on uint8 films [N, S, S] with integer targets in [0, classes)."""
    targets = np.asarray(targets, np.int64)
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} films but {len(targets)} targets")
    present = np.unique(targets)
    if len(present) < 2 or present.min() < 0 or present.max() >= classes:
        raise UserError(f"a classifier needs films of at least two of its {classes} classes (found {present.tolist()})")
    gen = torch.Generator().manual_seed(seed)
    by_class = [torch.from_numpy(np.flatnonzero(targets == k)) for k in present]
    x_all, y_all = _to_input(images), torch.from_numpy(targets)
    # Initial weights and dropout draw from the global RNG: seeded here, and the caller's stream left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SmallCNN(classes)
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
        net.train()
        for _ in range(steps):
            which = torch.randint(0, len(by_class), (batch_size,), generator=gen)
            rows = torch.empty(batch_size, dtype=torch.int64)
            for k, members in enumerate(by_class):
                chosen = which == k
                rows[chosen] = members[torch.randint(0, len(members), (int(chosen.sum()),), generator=gen)]
            loss = F.cross_entropy(net(_jitter(x_all[rows], gen)), y_all[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return Classifier(net.eval(), classes)


def accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=1) == np.asarray(targets)))


def balanced_accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean over the classes present of the fraction of their films predicted as them."""
    targets = np.asarray(targets)
    predicted = np.argmax(probs, axis=1)
    return float(np.mean([np.mean(predicted[targets == k] == k) for k in np.unique(targets)]))


def auroc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``targets`` (1 positive), by average ranks."""
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets).astype(bool)
    positives, negatives = int(targets.sum()), int((~targets).sum())
    if not positives or not negatives:
        raise ValueError("AUROC needs films of both classes")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average rank of tied scores, so that a tie counts half.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    mean_rank = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(mean_rank, counts)
    return float((ranks[targets].sum() - positives * (positives + 1) / 2) / (positives * negatives))
