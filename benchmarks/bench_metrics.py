"""Metrics benchmarks: feature extraction throughput, and the batched nearest-neighbour SSIM search against a naive
scikit-image loop (measured on a subset of pairs in the same run, reported as pairs/s and their ratio).

    python benchmarks/bench_metrics.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from medsyngan.data.shared import nih_sample_dir

NIH_DIR = nih_sample_dir()


def _images(n: int) -> tuple[np.ndarray, str]:
    """Real NIH 64-px images (tiled with flips to reach n) when present, else seeded noise."""
    folder = NIH_DIR / "images-64"
    if folder.is_dir():
        from medsyngan.metrics.images import read_image_folder

        base = read_image_folder(folder)
        reps = [base, base[:, :, ::-1], base[:, ::-1, :], base[:, ::-1, ::-1]]
        return np.ascontiguousarray(np.concatenate(reps)[:n]), "NIH 64 px"
    return np.random.default_rng(0).integers(0, 256, (n, 64, 64), dtype=np.uint8), "noise 64 px (NIH sample missing)"


def _rate(fn, count: int, repeat: int = 1) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return count * repeat / (time.perf_counter() - start)


def run(quick: bool) -> dict:
    from skimage.metrics import structural_similarity

    from medsyngan.metrics.features import RandomExtractor
    from medsyngan.metrics.pixel import nearest_neighbours

    n = 200 if quick else 1000
    images, source = _images(2 * n)
    fake, train = images[:n], images[n:]
    result: dict = {"source": source, "threads": torch.get_num_threads()}

    ext = RandomExtractor()
    batch = images[:256]
    result["random_features_img_per_s"] = _rate(lambda: ext(batch), len(batch))
    # Throughput does not depend on the weights, so the Inception figure is measured with the architecture's own
    # initialisation when the published file is absent (resize to 299 included).
    from medsyngan.metrics.features import InceptionExtractor, resize_clean
    from medsyngan.metrics.inception import FIDInceptionV3

    inc = InceptionExtractor(net=FIDInceptionV3().eval().requires_grad_(False))
    small = images[:16 if quick else 64]
    result["inception_features_img_per_s"] = _rate(lambda: inc(small), len(small))
    result["clean_resize_299_img_per_s"] = _rate(lambda: resize_clean(batch, 299), len(batch))

    start = time.perf_counter()
    nearest_neighbours(fake, train)
    batched_s = time.perf_counter() - start
    result["nn_ssim_pairs"] = n * n
    result["nn_ssim_batched_s"] = batched_s
    result["nn_ssim_batched_pairs_per_s"] = n * n / batched_s

    sub_f, sub_t = (5, 100) if quick else (10, 200)
    a, b = fake[:sub_f] / 255.0, train[:sub_t] / 255.0
    start = time.perf_counter()
    for x in a:
        max(structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
            for y in b)
    naive_s = time.perf_counter() - start
    result["nn_ssim_naive_pairs"] = sub_f * sub_t
    result["nn_ssim_naive_pairs_per_s"] = sub_f * sub_t / naive_s
    result["nn_ssim_naive_projected_s"] = n * n / result["nn_ssim_naive_pairs_per_s"]
    result["nn_ssim_speedup"] = result["nn_ssim_batched_pairs_per_s"] / result["nn_ssim_naive_pairs_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200×200 search instead of 1,000×1,000")
    args = parser.parse_args()
    res = run(args.quick)
    print(f"metrics benchmark ({res['source']}, {res['threads']} torch threads)")
    print("| figure | value |\n| --- | --- |")
    for key, value in res.items():
        if key not in ("source", "threads"):
            print(f"| {key} | {value:,.1f} |" if isinstance(value, float) else f"| {key} | {value:,} |")


if __name__ == "__main__":
    sys.exit(main())
