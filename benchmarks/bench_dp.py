"""DP-SGD overhead on the DCGAN-64 discriminator step: private D-step time ÷ non-private D-step time.

One D update on a batch of 64 real and 64 generated 64-px images, DP-compatible discriminator (GroupNorm), Adam,
on this machine's CPU. Every variant runs in the same process, interleaved round by round, and the median per
variant is kept. Two clocks: wall time, and this process's CPU time — on a shared machine other processes stretch
wall time unevenly, while CPU time counts only this process's work; the headline ratio uses CPU time.

- ``nonprivate``: the trainer's ordinary ``DiscriminatorUpdate`` (the reference; ratio 1).
- ``ghost``: our default engine (book-keeping clipping with mixed ghost norms; one forward of real+fake, one
  backward to the layer outputs, weight gradients once) — clip, noise, one accountant step, Adam.
- ``vmap``: our generic engine (torch.func per-sample gradients of the real loss + ordinary fake backward).
- ``opacus_textbook``: Opacus' DCGAN example loop — ``GradSampleModule`` + ``DPOptimizer``, D called on real and
  fake, one backward of the summed loss, per-sample gradients of both materialised and clipped together.
- ``opacus_ghost``: Opacus' own ghost clipping (``GradSampleModuleFastGradientClipping``, two backward passes) on
  the 128 real + fake rows, BCE loss — the library's fast path, for reference.

Target: ghost ≤ 1.5× the non-private step (the textbook Opacus loop costs about 2.7× here).
Run: ``python benchmarks/bench_dp.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from medsyngan.config import load_config  # noqa: E402
from medsyngan.privacy.accounting import PrivacyAccountant  # noqa: E402
from medsyngan.privacy.dp import DPSession  # noqa: E402
from medsyngan.privacy.sampling import PoissonUnitSampler  # noqa: E402
from medsyngan.training.step import DiscriminatorUpdate, GANTrainer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "dp.json"
BATCH = 64
SIGMA, CLIP = 1.0, 1.0


def _trainer(cfg) -> GANTrainer:
    return GANTrainer(cfg, device="cpu")


def _session(trainer, cfg, engine: str) -> DPSession:
    """A session at a fixed σ = 1 (no calibration: the step's cost does not depend on σ)."""
    images = np.zeros((BATCH * 4, 64, 64), np.uint8)
    sampler = PoissonUnitSampler(images, None, BATCH, "image", seed=0)
    accountant = PrivacyAccountant(sampler.sample_rate, SIGMA, 1e-5)
    session = DPSession(trainer, sampler, accountant, math.inf, CLIP, guaranteed_steps=10**9, planned_steps=10**9,
                        engine=engine)
    trainer.d_update = session.update
    return session


def _opacus_textbook(cfg):
    """Opacus' examples/dcgan.py discriminator update on the same network."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from medsyngan.models.registry import build_discriminator

    # Opacus' hooks warn that the first layer's input needs no gradient; that is the normal case for images.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.manual_seed(cfg.run.seed)
    D = GradSampleModule(build_discriminator(cfg.model).train())
    t = cfg.train
    opt = DPOptimizer(torch.optim.Adam(D.parameters(), lr=t.lr_d, betas=(t.beta1, t.beta2)),
                      noise_multiplier=SIGMA, max_grad_norm=CLIP, expected_batch_size=BATCH)

    def step(real, fake):
        opt.zero_grad(set_to_none=True)
        loss = F.softplus(-D(real)).mean() + F.softplus(D(fake)).mean()
        loss.backward()
        opt.step()

    return step


def _opacus_ghost(cfg):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    from medsyngan.models.registry import build_discriminator

    torch.manual_seed(cfg.run.seed)
    D = GradSampleModuleFastGradientClipping(build_discriminator(cfg.model).train(), max_grad_norm=CLIP,
                                             use_ghost_clipping=True, loss_reduction="mean")
    t = cfg.train
    opt = DPOptimizerFastGradientClipping(
        torch.optim.Adam(D.parameters(), lr=t.lr_d, betas=(t.beta1, t.beta2)), noise_multiplier=SIGMA,
        max_grad_norm=CLIP, expected_batch_size=2 * BATCH, loss_reduction="mean")
    criterion = DPLossFastGradientClipping(D, opt, torch.nn.BCEWithLogitsLoss(), loss_reduction="mean")
    labels = torch.cat([torch.ones(BATCH), torch.zeros(BATCH)])

    def step(real, fake):
        opt.zero_grad(set_to_none=True)
        criterion(D(torch.cat([real, fake])), labels).backward()
        opt.step()

    return step


def run(quick: bool = False) -> dict:
    # Private steps always run in float32 (enable_dp turns autocast off), so the mechanism's cost is measured
    # against a float32 non-private step; "nonprivate_amp" is the product's non-private step where bf16 pays (AMX).
    cfg = load_config("dcgan64", ["model.dp_compatible=true", "train.amp=off"])
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(BATCH, 1, 64, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        fake = _trainer(cfg).generate(BATCH)[0].detach()

    plain = _trainer(cfg)
    plain_amp = _trainer(load_config("dcgan64", ["model.dp_compatible=true"]))
    plain_update = DiscriminatorUpdate()
    ghost, vmap = _trainer(cfg), _trainer(cfg)
    sessions = [_session(ghost, cfg, "ghost"), _session(vmap, cfg, "vmap")]
    textbook, opacus_ghost = _opacus_textbook(cfg), _opacus_ghost(cfg)
    variants = {
        "nonprivate": lambda: plain_update.step(plain, real, fake),
        "nonprivate_amp": lambda: plain_update.step(plain_amp, real, fake),
        "ghost": lambda: ghost.d_update.step(ghost, real, fake),
        "vmap": lambda: vmap.d_update.step(vmap, real, fake),
        "opacus_textbook": lambda: textbook(real, fake),
        "opacus_ghost": lambda: opacus_ghost(real, fake),
    }
    rounds = 3 if quick else 10
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up (allocator, oneDNN primitive cache)
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    med_wall = {k: statistics.median(v) for k, v in wall.items()}
    return {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "engines": [s.engine for s in sessions],
        "batch": BATCH,
        "rounds": rounds,
        "d_step_cpu_s": {k: round(v, 4) for k, v in med_cpu.items()},
        "d_step_wall_s": {k: round(v, 4) for k, v in med_wall.items()},
        "ratio_vs_nonprivate": {k: round(v / med_cpu["nonprivate"], 3) for k, v in med_cpu.items()},
        "ratio_vs_nonprivate_wall": {k: round(v / med_wall["nonprivate"], 3) for k, v in med_wall.items()},
        "target_ratio": 1.5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed rounds instead of 10")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    figures = run(args.quick)
    print(f"DCGAN-64 D step, batch {figures['batch']} real + {figures['batch']} fake, CPU, "
          f"{figures['threads']} threads, median of {figures['rounds']}")
    print(f"{'variant':<17}{'CPU s':>8}{'× non-private':>15}{'wall s':>9}{'× (wall)':>10}")
    for name, seconds in figures["d_step_cpu_s"].items():
        print(f"{name:<17}{seconds:>8.3f}{figures['ratio_vs_nonprivate'][name]:>15.2f}"
              f"{figures['d_step_wall_s'][name]:>9.3f}{figures['ratio_vs_nonprivate_wall'][name]:>10.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
