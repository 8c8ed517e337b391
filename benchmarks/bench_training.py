"""Training throughput: images/s through a full G+D step, per architecture, on this machine.

DCGAN-64 is compared with the plain textbook loop (pytorch/examples/dcgan: 1 channel, batch 64, BatchNorm, BCE,
Adam 2e-4) run in the same process on the same networks and data, alternating timed rounds so that the noise of a
shared machine hits both alike. Run: ``python benchmarks/bench_training.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "training.json"


class TextbookD(nn.Module):
    """pytorch/examples/dcgan's Discriminator: its network is ours plus a final Sigmoid, output flattened."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(x)).view(-1, 1).squeeze(1)


def textbook_loop(netG: nn.Module, netD: nn.Module, nz: int, lr: float = 2e-4, beta1: float = 0.5):
    """pytorch/examples/dcgan/main.py's training iteration, statement for statement; returns step(real, noise)."""
    criterion = nn.BCELoss()
    optimizerD = torch.optim.Adam(netD.parameters(), lr=lr, betas=(beta1, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=lr, betas=(beta1, 0.999))
    real_label, fake_label = 1.0, 0.0

    def step(real_cpu: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, float]:
        # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
        netD.zero_grad()
        batch_size = real_cpu.size(0)
        label = torch.full((batch_size,), real_label, dtype=real_cpu.dtype)
        output = netD(real_cpu)
        errD_real = criterion(output, label)
        errD_real.backward()
        D_x = output.mean().item()
        if noise is None:
            noise = torch.randn(batch_size, nz, 1, 1)
        fake = netG(noise)
        label.fill_(fake_label)
        output = netD(fake.detach())
        errD_fake = criterion(output, label)
        errD_fake.backward()
        D_G_z1 = output.mean().item()
        errD = errD_real + errD_fake
        optimizerD.step()
        # (2) Update G network: maximize log(D(G(z)))
        netG.zero_grad()
        label.fill_(real_label)
        output = netD(fake)
        errG = criterion(output, label)
        errG.backward()
        D_G_z2 = output.mean().item()
        optimizerG.step()
        return {"d_loss": errD.item(), "g_loss": errG.item(), "D_x": D_x, "D_G_z1": D_G_z1, "D_G_z2": D_G_z2}

    return step


def _tiny_real(batch: int, size: int, n: int = 8) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(batch, 1, size, size, generator=gen) * 2 - 1 for _ in range(n)]


def _trainer(preset: str, overrides: list[str] | None = None):
    from medsyngan.config import load_config
    from medsyngan.training.step import GANTrainer

    cfg = load_config(preset, ["run.device=cpu", *(overrides or [])])
    return GANTrainer(cfg, device="cpu"), cfg


def _time(fn: Callable[[], object], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return time.perf_counter() - start


def bench_dcgan_vs_textbook(rounds: int, steps: int, compiled: bool) -> dict[str, float]:
    """Interleaved timing rounds of the textbook loop, our step (default precision: bf16 autocast where the hardware
    has it), our step in float32, and (optionally) our step with torch.compile."""
    import copy

    trainer, cfg = _trainer("dcgan64")
    textbook = textbook_loop(copy.deepcopy(trainer.G), TextbookD(copy.deepcopy(trainer.D)), cfg.model.z_dim)
    batch = cfg.train.batch_size
    reals = _tiny_real(batch, 64)
    it = iter(range(10**9))
    variants: dict[str, Callable[[], object]] = {
        "textbook": lambda: textbook(reals[next(it) % len(reals)]),
        "ours": lambda: trainer.train_step(lambda: reals[next(it) % len(reals)]),
    }
    if trainer.autocast_dtype is not None:
        fp32, _ = _trainer("dcgan64", ["train.amp=off"])
        variants["ours_fp32"] = lambda: fp32.train_step(lambda: reals[next(it) % len(reals)])
    figures: dict[str, float] = {}
    if compiled:
        fast, _ = _trainer("dcgan64", ["train.compile=true"])
        variants["ours_compiled"] = lambda: fast.train_step(lambda: reals[next(it) % len(reals)])
        figures["compile_s"] = _time(variants["ours_compiled"], 1)  # first step compiles
    for fn in variants.values():  # warm-up: allocator, oneDNN primitive caches, the G-step recompile
        _time(fn, 2)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(_time(fn, steps))
    ips = {name: batch * steps / statistics.median(t) for name, t in times.items()}
    figures["textbook_dcgan64_img_per_s"] = ips["textbook"]
    figures["dcgan64_img_per_s"] = ips["ours"]
    figures["ratio_vs_textbook"] = ips["ours"] / ips["textbook"]
    figures["precision"] = str(trainer.autocast_dtype or torch.float32).removeprefix("torch.")
    if "ours_fp32" in ips:
        figures["dcgan64_fp32_img_per_s"] = ips["ours_fp32"]
        figures["ratio_fp32_vs_textbook"] = ips["ours_fp32"] / ips["textbook"]
    if compiled:
        figures["dcgan64_compiled_img_per_s"] = ips["ours_compiled"]
        figures["ratio_compiled_vs_textbook"] = ips["ours_compiled"] / ips["textbook"]
    return figures


def bench_arch(preset: str, steps: int, overrides: list[str] | None = None) -> float:
    trainer, cfg = _trainer(preset, overrides)
    reals = _tiny_real(cfg.train.batch_size, cfg.model.resolution, 2)
    it = iter(range(10**9))

    def step() -> None:
        trainer.train_step(lambda: reals[next(it) % 2])

    _time(step, 1)
    return cfg.train.batch_size * steps / _time(step, steps)


def run(quick: bool = False) -> dict:
    torch.manual_seed(0)
    figures: dict = {
        "device": f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    figures.update(bench_dcgan_vs_textbook(rounds=3 if quick else 5, steps=2 if quick else 5, compiled=not quick))
    print(f"  dcgan64 vs textbook: {figures['ratio_vs_textbook']:.2f}x", file=sys.stderr, flush=True)
    # ProGAN is timed at its final stage, the most expensive; earlier stages of its schedule are far cheaper.
    final = ["train.kimg_per_phase=1e-6"]
    for preset, extra in [("progan64", final), ("stylegan2-64", []), ("progan256", final), ("stylegan2-256", [])]:
        steps = 1 if preset.endswith("256") else (2 if quick else 4)
        figures[f"{preset}_img_per_s"] = bench_arch(preset, steps, extra)
        print(f"  {preset}: {figures[f'{preset}_img_per_s']:.2f} img/s", file=sys.stderr, flush=True)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter timing rounds")
    args = parser.parse_args(argv)
    figures = run(args.quick)
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value:.2f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
