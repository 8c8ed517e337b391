"""Deterministic decisions of a federation: who takes part in a round, what each hospital holds out, seeds.

Flower samples clients with the global `random` module; we never rely on it. Every choice here is a pure
function of (run seed, round, hospital id), so that a resumed federation makes exactly the same choices as an
uninterrupted one and a hospital's randomness does not depend on which process or node id it landed on.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from medsyngan.errors import UserError


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of identifiers (stable across processes, unlike hash())."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def participants(hospitals: list[int], fraction: float, quorum: int, seed: int, round_: int) -> list[int]:
    """The hospitals asked to train in a round: ceil(fraction · N), never fewer than the quorum."""
    count = min(len(hospitals), max(quorum, math.ceil(fraction * len(hospitals))))
    rng = np.random.default_rng(derive_seed(seed, "participants", round_))
    return sorted(int(h) for h in rng.choice(sorted(hospitals), size=count, replace=False))


def split_holdout(patients: np.ndarray, seed: int, hospital: int,
                  fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Patient-disjoint train / held-out image indices inside one hospital.

    ``fraction`` of the hospital's patients (at least one, and never all; none when it is 0) are held out.
    Held-out images are used only for the evaluation a hospital reports as aggregates; they never enter training,
    so they are outside the DP accounting and outside the training-set membership audit.
    """
    if fraction == 0:
        return np.arange(len(patients)), np.arange(0)
    unique = np.unique(patients)
    if len(unique) < 2:
        raise UserError(
            f"hospital {hospital} has {len(unique)} patient(s); it needs at least 2 to keep a held-out patient "
            "(use fewer hospitals or more data, or federated.holdout_fraction=0)"
        )
    rng = np.random.default_rng(derive_seed(seed, "holdout", hospital))
    n_holdout = min(len(unique) - 1, max(1, round(fraction * len(unique))))
    held = set(rng.choice(unique, size=n_holdout, replace=False).tolist())
    mask = np.array([p in held for p in patients])
    return np.flatnonzero(~mask), np.flatnonzero(mask)
