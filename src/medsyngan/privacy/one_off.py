"""What a statistic released once under DP has in common (the mean image, the label frequencies): it is charged
before it is computed, computed with the noise seed the charge returned, kept, and read back on resume.

The DP session (:class:`~medsyngan.privacy.session.DPSession`) sets ``begin`` (charge the release, write the ledger,
return the noise seed) and ``finished`` (write the ledger with the released value)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch

Released = TypeVar("Released")


class OneOffRelease(Generic[Released]):
    #: Names the release in the error raised when nothing can charge it.
    what = "one-off release"

    def __init__(self) -> None:
        self.begin: Callable[[], int] | None = None
        self.finished: Callable[[], None] = lambda: None
        self.released: Released | None = None

    def _release_once(self, compute: Callable[[torch.Generator], Released]) -> Released:
        """The released value: computed at the first call, with the noise of the charge ``begin`` makes."""
        if self.released is None:
            if self.begin is None:
                raise RuntimeError(f"the {self.what} has no session to charge it")
            self.released = compute(torch.Generator().manual_seed(self.begin()))
            self.finished()
        return self.released
