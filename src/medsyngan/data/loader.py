"""Shuffled, resumable, fast training batches from a uint8 image array.

The images are copied once into RAM as a (N, S·S) uint8 array; a batch is one gather of uint8 rows and one
conversion to float in [-1, 1] (on the device when it is a GPU).
Each epoch's order is a permutation derived from (seed, epoch) alone, so the whole state is
(epoch, position, augmentation RNG) and a resumed run sees exactly the batches the first run would have.
With ``labels`` (one float vector per image, :mod:`medsyngan.data.labels`) a batch is (images, labels), the
labels of the same rows; without, the images alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medsyngan.config import AugmentSection
from medsyngan.data.augment import augment_batch, is_active
from medsyngan.errors import UserError


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, epoch]).permutation(n)


class BatchLoader:
    """Infinite iterator of (B, 1, S, S) float32 batches in [-1, 1] on ``device`` (with ``labels``: pairs of such a
    batch and its (B, c_dim) float32 labels)."""

    def __init__(
        self,
        images: np.ndarray,
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
        augment: AugmentSection | None = None,
        drop_last: bool = True,
        labels: np.ndarray | None = None,
    ):
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N, S, S], got {images.dtype} {images.shape}")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(labels)} label vectors for {len(images)} images")
        n = images.shape[0]
        if n == 0:
            raise UserError("the training set is empty; check the dataset path, --split/--views filters or partition")
        if drop_last and n < batch_size:
            raise UserError(
                f"train.batch_size ({batch_size}) exceeds the {n} training images; lower train.batch_size"
            )
        self.n, self.size, self.batch_size = n, images.shape[1], batch_size
        self.seed, self.drop_last = seed, drop_last
        self.device = torch.device(device)
        self.augment = augment if is_active(augment) else None
        # A private writable copy in RAM: random row gathers from a memmap would hit the disk.
        self._data = np.array(images, dtype=np.uint8, copy=True).reshape(n, -1)
        self._labels = None if labels is None else torch.from_numpy(np.asarray(labels, np.float32).reshape(n, -1))
        self._aug_gen = torch.Generator().manual_seed(seed)
        self.epoch, self.position = 0, 0
        self._perm = epoch_permutation(n, seed, 0)

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        end = self.position + self.batch_size
        if end > self.n and (self.drop_last or self.position >= self.n):
            self.epoch += 1
            self.position, end = 0, self.batch_size
            self._perm = epoch_permutation(self.n, self.seed, self.epoch)
        idx = self._perm[self.position : min(end, self.n)]
        self.position = end
        rows = np.take(self._data, idx, axis=0)
        # The gather and the conversion are small single-threaded numpy passes: torch's intra-op threads cost
        # more in synchronisation than they save on a batch this size, badly so on a busy machine. On a GPU the
        # batch travels as uint8 (a quarter of the bytes) and is converted there.
        if self.device.type == "cpu":
            arr = np.multiply(rows, np.float32(2.0 / 255.0), dtype=np.float32)
            x = torch.from_numpy(np.subtract(arr, np.float32(1.0), out=arr))
        else:
            x = torch.from_numpy(rows).to(self.device).mul(2.0 / 255.0).sub_(1.0)
        x = x.view(-1, 1, self.size, self.size)
        if self.augment is not None:
            x = augment_batch(x, self.augment, self._aug_gen)
        if self._labels is None:
            return x
        return x, self._labels[torch.from_numpy(idx)].to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "n": self.n,
            "batch_size": self.batch_size,
            "aug_rng": self._aug_gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n"]) != self.n or int(state["batch_size"]) != self.batch_size:
            raise UserError(
                f"checkpoint was taken with {state['n']} images and batch size {state['batch_size']}, "
                f"this run has {self.n} and {self.batch_size}; resume with the same data and train.batch_size"
            )
        self.seed = int(state["seed"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = epoch_permutation(self.n, self.seed, self.epoch)
        self._aug_gen.set_state(state["aug_rng"])
