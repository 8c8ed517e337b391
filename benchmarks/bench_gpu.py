"""GPU training speed and memory of the style-based families: images/s and peak memory, float32 against bf16.

One training step of ``GANTrainer`` (D step, G step, lazy R1 and path-length regularisation as the preset sets
them) at the preset's batch, on CUDA. Each (preset, precision) pair is warmed up, then timed over ``--steps`` steps
with the GPU synchronised at both ends; peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps.

    python benchmarks/bench_gpu.py --out results.json [--presets stylegan2-256 stylegan3-256] [--steps 10]

Without CUDA it runs the same loop on the CPU at 64 px for two steps (a check that the script works, no figures).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from medsyngan.config import load_config  # noqa: E402
from medsyngan.training.step import GANTrainer  # noqa: E402


def measure(preset: str, amp: str, steps: int, warmup: int, device: str, overrides: list[str]) -> dict:
    cfg = load_config(preset, [f'train.amp="{amp}"', *overrides])
    trainer = GANTrainer(cfg, device=device)
    size, batch = cfg.model.resolution, cfg.train.batch_size
    gen = torch.Generator(device=device).manual_seed(0)
    real = torch.rand(batch, 1, size, size, generator=gen, device=device) * 2 - 1
    next_real = lambda: real  # noqa: E731 - a fixed batch: the step's cost, not the loader's
    for _ in range(warmup):
        trainer.train_step(next_real)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next_real)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    images = steps * batch * cfg.train.d_steps_per_g
    return {"preset": preset, "amp": amp, "resolution": size, "batch": batch, "steps": steps,
            "img_per_s": round(images / seconds, 2),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["stylegan2-256", "stylegan3-256"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    small = [] if cuda else ["model.resolution=64", "data.size=64", "train.batch_size=4", "model.fmap_base=512",
                             "model.fmap_max=32"]
    steps, warmup = (args.steps, args.warmup) if cuda else (2, 1)
    if cuda:
        torch.backends.cudnn.benchmark = True
    rows = []
    for preset in args.presets:
        for amp in ("off", "bf16"):
            row = measure(preset, amp, steps, warmup, device, small)
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
              "torch": torch.__version__, "rows": rows}
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
