"""The small CNN the classifier metrics train (utility, detectability, the re-identification verifier's embedding).

One network for every question so that a figure compares training data, never architectures::

    net = train_classifier(images_u8, targets, ClassifierSettings(), seed=0)   # targets [N, C], NaN = unknown
    p = predict(net, eval_u8)                                                  # [N, C] probabilities

:class:`SmallCNN`: four stride-2 3×3 convolutions (w, 2w, 4w, 4w channels), each followed by GroupNorm and a ReLU
that is not in place, then a 2×2 average pool (chest films are read by layout: the heart's side, the diaphragm's
height) and one linear layer. GroupNorm instead of BatchNorm and out-of-place activations keep every sample's
computation apart, which DP-SGD's per-sample gradients need (Opacus' ``GradSampleModule`` computes them). Images
above :data:`INPUT_SIZE` are downsampled to it with antialiasing: the labels these metrics score are visible at
64 px, and the cost then does not grow with the resolution.

Training is a fixed number of epochs of Adam on the masked binary cross-entropy (a NaN target — e.g. sex not
recorded — contributes nothing), with a random translation of a few pixels as the only augmentation (a mirror
would move the heart). Everything random (initial weights, order, augmentation, DP sampling and noise) is drawn
from generators seeded by ``seed``, and training runs at a fixed number of torch threads
(:func:`training_threads`, :func:`fixed_threads`: intra-op reductions split by thread count), so a classifier is a
function of its data, settings and seed on a given kind of CPU, whichever process trains it; the global torch RNG
is left as it was. The patient-level DP-SGD variant is
:func:`medsyngan.metrics.private_classifier.train_private_classifier`; :func:`cached_network` keeps a trained
network on disk under a hash of what it was trained from (:func:`cache_key`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsyngan.errors import UserError
from medsyngan.metrics.features import images_digest
from medsyngan.rundir import atomic_write_bytes
from medsyngan.runtime import cache_dir

T = TypeVar("T")
INPUT_SIZE = 64
CACHE_VERSION = 2  # part of every cache key: raise it when a training procedure changes


@dataclass(frozen=True)
class ClassifierSettings:
    """How a classifier is trained; part of every cache key."""

    width: int = 16  # channels of the first convolution (then 2w, 4w, 4w)
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    shift: float = 2.0  # largest random translation, in pixels at INPUT_SIZE
    min_steps: int = 60  # a floor for very small sets, so that a handful of films still trains

    def steps(self, films: int) -> int:
        return max(self.min_steps, math.ceil(self.epochs * films / self.batch_size))


class SmallCNN(nn.Module):
    """See the module docstring; ``outputs`` logits per image, input [B, 1, S, S] in [-1, 1]."""

    def __init__(self, outputs: int, width: int = 16):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for cout in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(min(4, cout), cout), nn.ReLU()]
            cin = cout
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.features = 4 * cin
        self.head = nn.Linear(self.features, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with the torch RNG seeded, leaving the caller's RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def to_input(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 [N, S, S] → float32 [N, 1, s, s] in [-1, 1], s = min(S, INPUT_SIZE) (antialiased downsampling)."""
    x = torch.from_numpy(np.array(images_u8, dtype=np.float32, copy=True))[:, None] / 127.5 - 1.0
    if x.shape[-1] > INPUT_SIZE:
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


def random_shift(x: torch.Tensor, shift: float, gen: torch.Generator, scale: float = 0.0) -> torch.Tensor:
    """Each image translated by up to ``shift`` pixels (and zoomed by up to ±``scale``), edges replicated."""
    if shift <= 0 and scale <= 0:
        return x
    n, size = len(x), x.shape[-1]
    offsets = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 * shift / size)
    zoom = 1 + (torch.rand(n, generator=gen) * 2 - 1) * scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = zoom
    theta[:, :, 2] = offsets
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-image mean binary cross-entropy over the targets that are known (not NaN); [B]."""
    known = ~torch.isnan(targets)
    loss = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(targets), reduction="none") * known
    return loss.sum(1) / known.sum(1).clamp(min=1)


def as_targets(targets: np.ndarray) -> torch.Tensor:
    t = np.asarray(targets, dtype=np.float32)
    return torch.from_numpy(t.reshape(len(t), -1).copy())


TRAINING_THREADS = 2  # the thread count of the published study figures (docs/results.md)
THREADS_ENV = "MEDSYNGAN_TRAINING_THREADS"  # another count (the test suite's one per worker): other networks


def training_threads() -> int:
    """The torch thread count the metrics' networks train at: :data:`TRAINING_THREADS` unless ``THREADS_ENV`` says
    otherwise; part of every cache key, since the trained weights depend on it."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return TRAINING_THREADS
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{THREADS_ENV}={value!r} is not a thread count; set a whole number ≥ 1 or unset it")
    return int(value)


def fixed_threads(train: Callable[..., T]) -> Callable[..., T]:
    """``train`` run at :func:`training_threads` torch threads, the caller's count restored after. A cached network
    is shared by every process that asks for its key, so it must not depend on the thread count of the first."""
    @functools.wraps(train)
    def run(*args: Any, **kwargs: Any) -> T:
        previous = torch.get_num_threads()
        torch.set_num_threads(training_threads())
        try:
            return train(*args, **kwargs)
        finally:
            torch.set_num_threads(previous)

    return run


@fixed_threads
def train_classifier(images_u8: np.ndarray, targets: np.ndarray, settings: ClassifierSettings, seed: int) -> SmallCNN:
    """A :class:`SmallCNN` fitted to ``targets`` ([N, C] in {0, 1}, NaN unknown) of ``images_u8``."""
    x, y = to_input(images_u8), as_targets(targets)
    net = seeded(seed, lambda: SmallCNN(y.shape[1], settings.width))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    order = torch.empty(0, dtype=torch.long)
    net.train()
    for _ in range(settings.steps(len(x))):
        if len(order) < settings.batch_size:
            order = torch.cat([order, torch.randperm(len(x), generator=gen)])
        idx, order = order[: settings.batch_size], order[settings.batch_size :]
        loss = masked_bce(net(random_shift(x[idx], settings.shift, gen)), y[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def predict(net: nn.Module, images_u8: np.ndarray, batch: int = 256) -> np.ndarray:
    """Probabilities [N, C] of ``net`` on ``images_u8``."""
    net.eval()
    out = [torch.sigmoid(net(to_input(images_u8[s : s + batch]))) for s in range(0, len(images_u8), batch)]
    return torch.cat(out).double().numpy()


# ---------------------------------------------------------------------------------------------------- cache
def cache_key(purpose: str, settings: Any, seed: int, *arrays: np.ndarray | None, **extra: Any) -> str:
    """A hash of what a trained network is a function of: its purpose, settings, seed, data and extras."""
    digest = hashlib.sha256(f"{CACHE_VERSION}|{purpose}|{sorted(asdict(settings).items())}|{seed}|"
                            f"{sorted(extra.items())}|threads={training_threads()}".encode())
    for array in arrays:
        if array is None:
            digest.update(b"none")
        elif array.dtype == np.uint8:
            digest.update(images_digest(array).encode())
        else:
            digest.update(f"{array.shape}|{array.dtype}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:32]


def cached_network(key: str, build: Callable[[], nn.Module], train: Callable[[], tuple[nn.Module, dict[str, Any]]]
                   ) -> tuple[nn.Module, dict[str, Any]]:
    """The network trained for ``key`` (``cache_dir()/classifiers``), training and storing it when absent.

    ``build()`` makes an untrained network of the right shape to load the stored weights into; ``train()``
    returns the trained network and plain facts about it (ε spent, threshold) that are stored beside it.
    """
    path = cache_dir() / "classifiers" / f"{key}.pt"
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            net = build()
            net.load_state_dict(stored["state"])
            return net.eval(), dict(stored["meta"])
        except (OSError, RuntimeError, KeyError, EOFError, ValueError, pickle.UnpicklingError):
            path.unlink(missing_ok=True)  # a torn or stale entry: train again
    net, meta = train()
    buf = io.BytesIO()
    torch.save({"state": net.state_dict(), "meta": meta}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return net.eval(), meta
