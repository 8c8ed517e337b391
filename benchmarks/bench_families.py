"""Training speed of every GAN family at 64 and 128 px, at its preset's width and at DCGAN's, in float32 and bf16.

For every family the model registry builds, at 64 and 128 px, the benchmark times full training steps
(``GANTrainer.train_step``: the D step(s), the G step, lazy regularizers, the EMA) of

- the family's preset at that resolution (``dcgan64``, ``progan64-short``, ``stylegan2-128``, ...: the first of
  ``<family><px>-short``, ``<family><px>``, ``<family>-<px>`` that exists; else the family's 64-px preset at the
  other size), and
- the same preset at DCGAN's width: the channels per resolution of the textbook DCGAN (ngf = ndf = 64) at that
  output size, ``fmap_base = 32 × px`` and ``fmap_max = 512`` (DCGAN itself: ngf = ndf = 64),

each in float32 (``train.amp = "off"``) and in bf16 autocast (``"bf16"``), together with the textbook DCGAN-64
(``dcgan64``) in the same precision. The variants of one group (a family, a size, a width) and the DCGAN-64
reference are timed in interleaved repetitions and the medians reported, so that the load of a shared machine hits
them alike; "× DCGAN-64" is the ratio to that reference within the group. Layouts and compilation follow
``train.channels_last = "auto"`` and ``train.compile = false``; ``--variants`` adds channels-last on and off and
torch.compile for every family at 64 px, in the precision ``train.amp = "auto"`` picks.

A repetition is ``REP_STEPS`` generator steps (one lazy path-length step of StyleGAN2 in every repetition; lazy R1
every 16 D steps); the networks see random images of the right shape, so data loading is not timed. ProGAN is timed
at its final stage (the resolution itself, stable), its most expensive; earlier stages are cheaper per image.

Run: ``python benchmarks/bench_families.py [--quick] [--variants] [--only stylegan2 ...]``; ``make bench`` runs it
(``benchmarks/run_all.py``) without ``--variants``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from medsyngan.config import load_config, preset_names  # noqa: E402
from medsyngan.models.registry import SUPPORTED_RESOLUTIONS  # noqa: E402
from medsyngan.training.step import GANTrainer  # noqa: E402

RESOLUTIONS = (64, 128)
REP_STEPS = 4
REFERENCE = "dcgan64"


def family_preset(arch: str, resolution: int) -> tuple[str, list[str]]:
    """The preset a family trains at ``resolution`` with, and the overrides that bring it there."""
    names = set(preset_names())
    for name in (f"{arch}{resolution}-short", f"{arch}{resolution}", f"{arch}-{resolution}"):
        if name in names:
            return name, []
    for other in (64, *RESOLUTIONS):
        for name in (f"{arch}{other}-short", f"{arch}{other}", f"{arch}-{other}"):
            if name in names:
                return name, [f"model.resolution={resolution}", f"data.size={resolution}"]
    raise LookupError(f"no preset of the {arch} family")


def dcgan_width(arch: str, resolution: int) -> list[str]:
    """Overrides that give a family the textbook DCGAN's channels at each resolution of a ``resolution``-px net."""
    if arch == "dcgan":
        return ["model.ngf=64", "model.ndf=64"]
    return [f"model.fmap_base={32 * resolution}", "model.fmap_max=512"]


class Timed:
    """One trainer and a closure that runs ``n`` of its steps on random images; ``images`` per step."""

    def __init__(self, preset: str, overrides: list[str]):
        cfg = load_config(preset, ["run.device=cpu", *overrides])
        self.trainer = GANTrainer(cfg, device="cpu")
        if self.trainer.growth is not None:  # the final resolution, stable
            self.trainer.set_images_seen(self.trainer.growth.total_images)
        size, batch = cfg.model.resolution, cfg.train.batch_size
        gen = torch.Generator().manual_seed(0)
        reals = [torch.rand(batch, 1, size, size, generator=gen) * 2 - 1 for _ in range(2)]
        counter = itertools.count()
        self.next_real: Callable[[], torch.Tensor] = lambda: reals[next(counter) % 2]
        self.images = self.trainer.batch_size * cfg.train.d_steps_per_g
        self.precision = "bf16" if self.trainer.autocast_dtype is not None else "fp32"

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.trainer.train_step(self.next_real)
        return time.perf_counter() - start


def interleaved(variants: dict[str, Timed], reps: int, steps: int, warmup: int = 1) -> dict[str, float]:
    """Median images/s of each variant over ``reps`` repetitions that alternate between the variants."""
    for timed in variants.values():
        timed.run(warmup)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, timed in variants.items():
            rates[name].append(timed.images * steps / timed.run(steps))
    return {name: statistics.median(values) for name, values in rates.items()}


def families(only: list[str] | None = None) -> list[str]:
    return [arch for arch in SUPPORTED_RESOLUTIONS if not only or arch in only]


def bench_group(arch: str, resolution: int, width: str, reps: int, steps: int) -> dict[str, float | str]:
    """fp32 and bf16 images/s of one family, size and width, and their ratios to DCGAN-64 timed alongside."""
    preset, overrides = family_preset(arch, resolution)
    if width == "dcgan":
        overrides = overrides + dcgan_width(arch, resolution)
    variants = {}
    for amp in ("off", "bf16"):
        variants[f"family {amp}"] = Timed(preset, [*overrides, f"train.amp={amp}"])
        variants[f"reference {amp}"] = Timed(REFERENCE, [f"train.amp={amp}"])
    rates = interleaved(variants, reps, steps)
    fp32, bf16 = rates["family off"], rates["family bf16"]
    return {"preset": preset, "batch": variants["family off"].images, "fp32": fp32, "bf16": bf16,
            "bf16_speedup": bf16 / fp32, "fp32_vs_dcgan64": fp32 / rates["reference off"],
            "bf16_vs_dcgan64": bf16 / rates["reference bf16"]}


def bench_variants(arch: str, reps: int, steps: int) -> dict[str, float]:
    """Images/s of a family's 64-px preset with channels-last off and on, and compiled, in the precision auto picks
    (compilation time excluded: it is reported apart)."""
    preset, overrides = family_preset(arch, 64)
    variants = {layout: Timed(preset, [*overrides, f"train.channels_last={layout}"]) for layout in ("off", "on")}
    start = time.perf_counter()
    variants["compiled"] = Timed(preset, [*overrides, "train.compile=true"])
    variants["compiled"].run(2)  # compiles the D and G steps
    compile_s = time.perf_counter() - start
    rates = interleaved(variants, reps, steps)
    return {"precision": variants["off"].precision, "nchw": rates["off"], "channels_last": rates["on"],
            "compiled": rates["compiled"], "compile_s": compile_s}


def table(rows: list[dict]) -> str:
    lines = ["| family | px | width | preset | batch | fp32 img/s | bf16 img/s | bf16 ÷ fp32 | fp32 × DCGAN-64 | "
             "bf16 × DCGAN-64 |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['px']} | {r['width']} | {r['preset']} | {r['batch']} | {r['fp32']:.1f} | "
                     f"{r['bf16']:.1f} | {r['bf16_speedup']:.2f} | {r['fp32_vs_dcgan64']:.2f} | "
                     f"{r['bf16_vs_dcgan64']:.2f} |")
    return "\n".join(lines)


def run(quick: bool = False, variants: bool = False, only: list[str] | None = None) -> dict:
    reps, steps = (3, 2) if quick else (5, REP_STEPS)
    torch.manual_seed(0)
    rows, figures = [], {}
    for arch, resolution, width in itertools.product(families(only), RESOLUTIONS, ("preset", "dcgan")):
        if resolution not in SUPPORTED_RESOLUTIONS[arch]:
            continue
        row = {"family": arch, "px": resolution, "width": width, **bench_group(arch, resolution, width, reps, steps)}
        rows.append(row)
        print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
        key = f"{arch}-{resolution} {width} width"
        figures.update({f"{key} fp32 img/s": round(row["fp32"], 2), f"{key} bf16 img/s": round(row["bf16"], 2),
                        f"{key} fp32 × dcgan64": round(row["fp32_vs_dcgan64"], 3),
                        f"{key} bf16 × dcgan64": round(row["bf16_vs_dcgan64"], 3)})
    print(table(rows), flush=True)
    if variants:
        for arch in families(only):
            measured = bench_variants(arch, reps, steps)
            print(f"{arch}-64 ({measured['precision']}): NCHW {measured['nchw']:.1f} img/s, channels-last "
                  f"{measured['channels_last']:.1f}, compiled {measured['compiled']:.1f} "
                  f"(compilation {measured['compile_s']:.0f} s)", flush=True)
            figures.update({f"{arch}-64 {k}": (round(v, 2) if isinstance(v, float) else v)
                            for k, v in measured.items()})
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions of 2 steps instead of 5 of 4")
    parser.add_argument("--variants", action="store_true", help="also channels-last and torch.compile at 64 px")
    parser.add_argument("--only", nargs="*", help="families to run (default: all)")
    args = parser.parse_args(argv)
    run(args.quick, args.variants, args.only)


if __name__ == "__main__":
    main()
