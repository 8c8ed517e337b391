"""Device choice, seeding, threads, the cache folder, and whether bf16 pays on this machine."""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from medsyngan.errors import UserError

log = logging.getLogger("medsyngan")

PRECISION_FILE = "precision-probe.json"
# bf16 must beat float32 by this factor in the probe: a tie is not worth bf16's rounding.
BF16_MIN_SPEEDUP = 1.15


def select_device(choice: str = "auto") -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device = 'cuda' but no CUDA device is visible; set run.device=auto or cpu")
    return torch.device(choice)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def cache_dir() -> Path:
    """Where derived data (built phantoms, real-set feature statistics, downloaded weights) is cached."""
    root = os.environ.get("MEDSYNGAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "medsyngan"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


# Part of the cache key: a verdict of an earlier way of measuring (wall clock on all threads, which a loaded
# machine's thread contention decided) is measured again.
PROBE_METHOD = "one-thread CPU time"


def _probe_key(device: torch.device) -> str:
    return f"{cpu_model()} | torch {torch.__version__} | {device.type} | {PROBE_METHOD}"


def _conv_seconds(dtype: torch.dtype | None, reps: int = 3) -> float:
    """CPU seconds of this thread for one forward+backward of a 3x3 convolution of DCGAN's middle layers' size, in
    ``dtype`` autocast (None: float32); the caller runs torch on this one thread."""
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(8, 64, 32, 32, generator=gen, requires_grad=True)
    start = time.thread_time()
    for _ in range(reps):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            y = conv(x)
        y.float().square().mean().backward()
    return (time.thread_time() - start) / reps


def measure_bf16_speedup(rounds: int = 5) -> tuple[float, float]:
    """(float32, bf16) seconds of the probe convolution on one core of this CPU: medians of interleaved rounds after
    a warm-up. It times one thread's CPU time, not the wall clock: what bf16 changes is the arithmetic of a core, and
    on a loaded machine the wall clock of several threads measures how long they wait for each other (a 2-core
    machine under load once timed bf16 at half float32's speed that way, at 1.8x it one thread at a time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for dtype in (None, torch.bfloat16):
            _conv_seconds(dtype, reps=1)
        fp32, bf16 = [], []
        for _ in range(rounds):
            fp32.append(_conv_seconds(None))
            bf16.append(_conv_seconds(torch.bfloat16))
    finally:
        torch.set_num_threads(threads)
    return statistics.median(fp32), statistics.median(bf16)


_verdicts: dict[str, bool] = {}


def bf16_pays(device: torch.device) -> bool:
    """Whether bf16 autocast trains faster than float32 on ``device``: always on CUDA (tensor cores); on a CPU as
    measured by :func:`measure_bf16_speedup` at first use. The verdict is cached per CPU model, torch version and
    device in the cache folder (``precision-probe.json``; delete it to measure again): CPUs that multiply in bf16
    (Intel AMX, AVX-512 BF16 on AMD Zen 4 and later) gain up to 2x, others emulate it and lose."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    key = _probe_key(device)
    if key in _verdicts:
        return _verdicts[key]
    path = cache_dir() / PRECISION_FILE
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    entry = known.get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("bf16"), bool):
        fp32, bf16 = measure_bf16_speedup()
        entry = {"bf16": fp32 / bf16 >= BF16_MIN_SPEEDUP, "fp32_ms": round(fp32 * 1e3, 3),
                 "bf16_ms": round(bf16 * 1e3, 3), "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        known[key] = entry
        from medsyngan.rundir import atomic_write_text

        atomic_write_text(path, json.dumps(known, indent=1) + "\n")
        log.info("bf16 probe on %s: float32 %.1f ms, bf16 %.1f ms -> train.amp auto uses %s", key, fp32 * 1e3,
                 bf16 * 1e3, "bf16" if entry["bf16"] else "float32")
    _verdicts[key] = entry["bf16"]
    return entry["bf16"]
