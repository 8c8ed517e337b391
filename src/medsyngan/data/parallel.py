"""Run a picklable function over jobs on every core, in order, falling back to this process for small work."""

from __future__ import annotations

import multiprocessing as mp
import os
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Below this much work (jobs × pixels per job) starting processes costs more than it saves.
_MIN_PARALLEL_WORK = 64 * 256 * 256


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def map_in_workers(
    fn: Callable[[T], R], jobs: Sequence[T], workers: int = 0, cost: int = 1, chunksize: int = 0
) -> Iterator[R]:
    """Yield fn(job) for each job in order. workers=0: all cores; 1: this process.

    Workers are forked where the platform can: a spawned worker re-imports the caller's main module (torch
    included), which costs seconds. The jobs run numpy and PIL only, never torch, so torch's thread pools in
    the parent (which do not survive a fork) are never touched in a worker.
    """
    n = default_workers() if workers <= 0 else workers
    if n == 1 or len(jobs) < 2 or len(jobs) * cost < _MIN_PARALLEL_WORK:
        yield from map(fn, jobs)
        return
    chunksize = chunksize or max(1, min(64, len(jobs) // (n * 8)))
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(processes=min(n, len(jobs))) as pool:
        results: Iterable[R] = pool.imap(fn, jobs, chunksize=chunksize)
        yield from results
