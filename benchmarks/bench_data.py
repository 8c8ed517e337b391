"""Data pipeline throughput: training batches from a prepared dataset (64 and 256 px) and prepare 1024→256.

Each figure comes with a reference measured in the same run, because the machine is shared and noisy:
- loading: BatchLoader against the obvious torch route (index_select on a uint8 tensor, then .float(), scaling
  with torch ops under torch's default threads);
- prepare: all cores against one process.

    python benchmarks/bench_data.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medsyngan.data.api import phantom_dataset
from medsyngan.data.loader import BatchLoader
from medsyngan.data.parallel import default_workers
from medsyngan.data.phantoms import write_phantoms
from medsyngan.data.prepare import PrepareSettings, prepare

TARGET_64 = 20_000.0


def _loader_rate(images: np.ndarray, batch: int, seconds: float) -> float:
    loader = BatchLoader(images, batch, seed=0, device="cpu")
    next(loader)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x = next(loader)
        n += x.shape[0]
    return n / (time.perf_counter() - start)


def _torch_reference_rate(images: np.ndarray, batch: int, seconds: float) -> float:
    data = torch.from_numpy(np.array(images).reshape(len(images), -1))
    s = images.shape[1]
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        idx = torch.randint(len(images), (batch,))
        x = torch.index_select(data, 0, idx).float().div(127.5).sub(1.0).view(-1, 1, s, s)
        n += x.shape[0]
    return n / (time.perf_counter() - start)


def run(quick: bool) -> dict:
    seconds = 1.0 if quick else 3.0
    figures: dict = {"cores": default_workers()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for size, patients, batch in ((64, 200 if quick else 1000, 64), (256, 50 if quick else 200, 32)):
            ds = phantom_dataset(patients, 3, size, seed=0, root=root / "cache")
            ours = _loader_rate(ds.images, batch, seconds)
            ref = _torch_reference_rate(ds.images, batch, seconds)
            figures[f"load_{size}px_img_per_s"] = round(ours)
            figures[f"load_{size}px_reference_img_per_s"] = round(ref)
            figures[f"load_{size}px_ratio"] = round(ours / ref, 2)
        figures["load_64px_target_met"] = figures["load_64px_img_per_s"] >= TARGET_64

        n = 24 if quick else 96
        raw = root / "raw1024"
        start = time.perf_counter()
        write_phantoms(raw, n, 1, 1024, seed=0)
        figures["phantoms_1024px_img_per_s"] = round(n / (time.perf_counter() - start), 1)
        for workers, key in ((default_workers(), "prepare_1024_to_256_img_per_s"), (1, "prepare_1024_to_256_one_process_img_per_s")):
            out = root / f"prep-{workers}"
            start = time.perf_counter()
            prepare(raw, out, PrepareSettings(size=256), workers=workers)
            figures[key] = round(n / (time.perf_counter() - start), 1)
        figures["prepare_parallel_ratio"] = round(
            figures["prepare_1024_to_256_img_per_s"] / figures["prepare_1024_to_256_one_process_img_per_s"], 2
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Smaller sets and shorter timings.")
    args = parser.parse_args()
    figures = run(args.quick)
    width = max(map(len, figures))
    print(f"{'figure':<{width}}  value")
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    sys.exit(0)


if __name__ == "__main__":
    main()
