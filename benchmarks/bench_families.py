"""Training speed of every GAN family at 64 and 128 px, at its preset's width and at DCGAN's, in float32 and bf16.

For every family the model registry builds, at 64 and 128 px, the benchmark times full training steps
(``GANTrainer.train_step``: the D step(s), the G step, lazy regularizers, the EMA) of

- the family's CPU preset at that resolution (``dcgan64``, ``progan64-short``, ``stylegan2-128``,
  ``stylegan3-64-fast``, ...: the first of ``<family><px>-short``, ``<family><px>``, ``<family>-<px>-fast``,
  ``<family>-<px>`` that exists; else the family's 64-px preset at the other size), and
- the same preset at DCGAN's width: the channels per resolution of the textbook DCGAN (ngf = ndf = 64) at that
  output size, ``fmap_base = 32 × px`` and ``fmap_max = 512`` (DCGAN itself: ngf = ndf = 64),

each in float32 (``train.amp = "off"``) and in bf16 autocast (``"bf16"``), together with the textbook DCGAN-64
(``dcgan64``) in the same precision. The variants of one group (a family, a size, a width) and the DCGAN-64
reference are timed in interleaved repetitions and the medians reported, so that the load of a shared machine hits
them alike; "× DCGAN-64" is the ratio to that reference within the group. Two clocks: images per wall-clock second
(what a user waits for, on a machine nobody else is using) and images per CPU second of this process (the work a
step takes; other processes do not inflate it, so with ``--threads 1``, where no thread waits for another, it
compares variants on a loaded machine too). Layouts and compilation follow
``train.channels_last = "auto"`` and ``train.compile = false``; ``--variants`` adds channels-last on and off and
torch.compile for every family at 64 px, in the precision ``train.amp = "auto"`` picks (compilation is refused
for a family whose loss differentiates gradients twice: it says so instead).

A repetition is ``REP_STEPS`` generator steps (one lazy path-length step of StyleGAN2 in every repetition; lazy R1
every 16 D steps); the networks see random images of the right shape, so data loading is not timed. ProGAN is timed
at its final stage (the resolution itself, stable), its most expensive; earlier stages are cheaper per image.

``--profile`` prints instead torch.profiler's table of where the CPU time of those steps goes (by operator and input
shape) for each family and size at the preset's width: what dominates a family that stays slow.

Run: ``python benchmarks/bench_families.py [--quick] [--reps N] [--steps N] [--variants] [--profile] [--threads N]
[--widths preset dcgan] [--only stylegan2 ...] [--sizes 64 128]``; ``make bench`` runs it
(``benchmarks/run_all.py``) with torch's threads, without ``--variants``.
"""

from __future__ import annotations

import argparse
import itertools
import os
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
    for name in preset_candidates(arch, resolution):
        if name in names:
            return name, []
    for other in (64, *RESOLUTIONS):
        for name in preset_candidates(arch, other):
            if name in names:
                return name, [f"model.resolution={resolution}", f"data.size={resolution}"]
    raise LookupError(f"no preset of the {arch} family")


def preset_candidates(arch: str, resolution: int) -> tuple[str, ...]:
    """A family's preset names at ``resolution``, the CPU-sized first."""
    return f"{arch}{resolution}-short", f"{arch}{resolution}", f"{arch}-{resolution}-fast", f"{arch}-{resolution}"


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

    def run(self, steps: int) -> tuple[float, float]:
        """Wall-clock and CPU seconds (all of this process's threads) of ``steps`` training steps."""
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.trainer.train_step(self.next_real)
        return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(variants: dict[str, Timed], reps: int, steps: int, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Median images per wall-clock second (``wall``) and per CPU second (``cpu``) of each variant over ``reps``
    repetitions that alternate between the variants."""
    for timed in variants.values():
        timed.run(warmup)
    rates: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in variants}
    for _ in range(reps):
        for name, timed in variants.items():
            for clock, seconds in zip(("wall", "cpu"), timed.run(steps)):
                rates[name][clock].append(timed.images * steps / seconds)
    return {name: {clock: statistics.median(v) for clock, v in clocks.items()} for name, clocks in rates.items()}


def profile(arch: str, resolution: int, steps: int, rows: int = 12) -> str:
    """torch.profiler's tables of ``steps`` training steps of the family's preset at ``resolution`` (after one
    warm-up step): the operators, then the operators and input shapes, that take the most CPU time of their own."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    preset, overrides = family_preset(arch, resolution)
    timed = Timed(preset, overrides)
    timed.run(1)
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        timed.run(steps)
    title = f"{preset} at {resolution} px ({timed.precision}), {steps} steps of {timed.images} images"
    by_operator = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=32)
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=32, max_shapes_column_width=80)
    return f"{title}, by operator\n{by_operator}\n{title}, by operator and input shape\n{by_shape}"


def families(only: list[str] | None = None) -> list[str]:
    return [arch for arch in SUPPORTED_RESOLUTIONS if not only or arch in only]


def bench_group(arch: str, resolution: int, width: str, reps: int, steps: int) -> dict[str, float | str]:
    """fp32 and bf16 images per second (wall clock and CPU) of one family, size and width, and their ratios to
    DCGAN-64 timed alongside."""
    preset, overrides = family_preset(arch, resolution)
    if width == "dcgan":
        overrides = overrides + dcgan_width(arch, resolution)
    variants = {}
    for amp in ("off", "bf16"):
        variants[f"family {amp}"] = Timed(preset, [*overrides, f"train.amp={amp}"])
        variants[f"reference {amp}"] = Timed(REFERENCE, [f"train.amp={amp}"])
    rates = interleaved(variants, reps, steps)
    row: dict[str, float | str] = {"preset": preset, "batch": variants["family off"].images}
    for precision, amp in (("fp32", "off"), ("bf16", "bf16")):
        family, reference = rates[f"family {amp}"], rates[f"reference {amp}"]
        row.update({precision: family["wall"], f"{precision}_cpu": family["cpu"],
                    f"{precision}_vs_dcgan64": family["wall"] / reference["wall"],
                    f"{precision}_cpu_vs_dcgan64": family["cpu"] / reference["cpu"]})
    return row


def bench_variants(arch: str, reps: int, steps: int) -> dict[str, float | str]:
    """Images/s of a family's 64-px preset with channels-last off and on, and compiled, in the precision auto picks
    (compilation time excluded: it is reported apart)."""
    from medsyngan.errors import UserError

    preset, overrides = family_preset(arch, 64)
    variants = {layout: Timed(preset, [*overrides, f"train.channels_last={layout}"]) for layout in ("off", "on")}
    out: dict[str, float | str] = {"precision": variants["off"].precision}
    start = time.perf_counter()
    try:
        variants["compiled"] = Timed(preset, [*overrides, "train.compile=true"])
        variants["compiled"].run(2)  # compiles the D and G steps
        out["compile_s"] = time.perf_counter() - start
    except UserError as exc:  # a loss that differentiates gradients twice: torch.compile cannot train it
        out["compile_refused"] = str(exc)
    rates = interleaved(variants, reps, steps)
    for name, label in (("off", "nchw"), ("on", "channels_last"), ("compiled", "compiled")):
        if name in rates:
            out.update({label: rates[name]["wall"], f"{label}_cpu": rates[name]["cpu"]})
    return out


COLUMNS = ["family", "px", "width", "preset", "batch", "fp32", "bf16", "fp32_cpu", "bf16_cpu", "fp32_vs_dcgan64",
           "bf16_vs_dcgan64", "fp32_cpu_vs_dcgan64", "bf16_cpu_vs_dcgan64"]
HEADERS = ["family", "px", "width", "preset", "batch", "fp32 img/s", "bf16 img/s", "fp32 img/CPU-s",
           "bf16 img/CPU-s", "fp32 × DCGAN-64", "bf16 × DCGAN-64", "fp32 × DCGAN-64 (CPU)", "bf16 × DCGAN-64 (CPU)"]


def table(rows: list[dict]) -> str:
    def cell(value: object) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def run(quick: bool = False, variants: bool = False, only: list[str] | None = None,
        widths: tuple[str, ...] = ("preset", "dcgan"), reps: int | None = None, steps: int = REP_STEPS,
        sizes: tuple[int, ...] = RESOLUTIONS) -> dict:
    reps = reps or (3 if quick else 5)
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    rows, figures = [], {}
    for arch, resolution, width in itertools.product(families(only), sizes, widths):
        if resolution not in SUPPORTED_RESOLUTIONS[arch]:
            continue
        row = {"family": arch, "px": resolution, "width": width,
               **bench_group(arch, resolution, width, reps, steps)}
        rows.append(row)
        print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
        key = f"{arch}-{resolution} {width} width"
        figures.update({f"{key} {c}": round(v, 3) if isinstance(v, float) else v
                        for c, v in row.items() if c not in ("family", "px", "width")})
    print(table(rows), flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at end", flush=True)
    if variants:
        for arch in families(only):
            measured = bench_variants(arch, reps, steps)
            compiled = (f"compiled {measured['compiled']:.1f} ({measured['compiled_cpu']:.1f}), compilation "
                        f"{measured['compile_s']:.0f} s" if "compiled" in measured
                        else f"compile refused: {measured['compile_refused']}")
            print(f"{arch}-64 ({measured['precision']}): NCHW {measured['nchw']:.1f} img/s "
                  f"({measured['nchw_cpu']:.1f}/CPU-s), channels-last {measured['channels_last']:.1f} "
                  f"({measured['channels_last_cpu']:.1f}), {compiled}", flush=True)
            figures.update({f"{arch}-64 {k}": (round(v, 3) if isinstance(v, float) else v)
                            for k, v in measured.items()})
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 5")
    parser.add_argument("--reps", type=int, help="repetitions of every variant (default 5, --quick 3)")
    parser.add_argument("--steps", type=int, default=REP_STEPS, help=f"generator steps per repetition ({REP_STEPS})")
    parser.add_argument("--variants", action="store_true", help="also channels-last and torch.compile at 64 px")
    parser.add_argument("--profile", action="store_true",
                        help="print where the CPU time of the preset's steps goes instead (torch.profiler)")
    parser.add_argument("--only", nargs="*", help="families to run (default: all)")
    parser.add_argument("--sizes", nargs="*", type=int, default=list(RESOLUTIONS), choices=RESOLUTIONS)
    parser.add_argument("--widths", nargs="*", default=["preset", "dcgan"], choices=["preset", "dcgan"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        for arch, resolution in itertools.product(families(args.only), args.sizes):
            print(profile(arch, resolution, args.steps), flush=True)
        return
    run(args.quick, args.variants, args.only, tuple(args.widths), args.reps, args.steps, tuple(args.sizes))


if __name__ == "__main__":
    main()
