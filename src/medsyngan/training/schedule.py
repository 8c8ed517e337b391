"""ProGAN's growth schedule (Karras et al. 2018): the resolution, fade-in and batch at every point of a run.

The schedule is a function of one public count: the real images D is *meant* to have seen, i.e. per D step the
configured batch of the stage's resolution (``train.batch_by_resolution``, else ``train.batch_size``), never the
realised size of a batch. Under DP-SGD a batch is a Poisson sample whose size is private; a schedule that followed
it would release it. Centralized, the trainer keeps the count (``GANTrainer.images_seen``); in a federation the
server keeps it and sends it with every round, so that all hospitals train the same stage and fade-in.

Phases, each ``train.kimg_per_phase`` thousand images long (600 in the paper): the start resolution (4 px) trains
for one phase; every doubling then fades in for one phase (alpha from 0 to 1, linear in images) and trains stable
for one phase. A run is complete after the stable phase of the final resolution: (1 + 2 · doublings) phases.

The stage is read once per generator step: the D steps of one G step all train at the stage and batch of its start.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from medsyngan.config import Config
from medsyngan.errors import UserError

START_RESOLUTION = 4


def progan_stage(images: int, phase_images: int, final_resolution: int) -> tuple[int, float]:
    """(stage resolution, fade-in alpha) after ``images`` real images, phases of ``phase_images`` images."""
    phase = images // phase_images
    if phase == 0:
        return START_RESOLUTION, 1.0
    resolution = START_RESOLUTION * 2 ** ((phase - 1) // 2 + 1)
    if resolution > final_resolution:
        return final_resolution, 1.0
    fading = (phase - 1) % 2 == 0
    return resolution, (images - phase * phase_images) / phase_images if fading else 1.0


@dataclass(frozen=True)
class GrowthSchedule:
    """The schedule of one ProGAN configuration; all counts are real images shown to D."""

    resolution: int
    phase_images: int
    batch_size: int
    d_steps_per_g: int = 1
    batch_by_resolution: Mapping[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: Config) -> "GrowthSchedule | None":
        """The schedule of ``cfg``; None for a family that does not grow."""
        if cfg.model.arch != "progan":
            return None
        t = cfg.train
        return cls(cfg.model.resolution, max(1, round(t.kimg_per_phase * 1000)), t.batch_size, t.d_steps_per_g,
                   dict(t.batch_by_resolution))

    @property
    def doublings(self) -> int:
        return int(math.log2(self.resolution // START_RESOLUTION))

    @property
    def total_images(self) -> int:
        """The count at which the final resolution's stable phase is over."""
        return (1 + 2 * self.doublings) * self.phase_images

    def stage(self, images: int) -> tuple[int, float]:
        return progan_stage(images, self.phase_images, self.resolution)

    def batch(self, resolution: int) -> int:
        """The D batch at a stage resolution."""
        return self.batch_by_resolution.get(resolution, self.batch_size)

    def _resolution_starts(self, images: int) -> int:
        """The count at which the resolution after the one trained at ``images`` starts fading in."""
        phase = images // self.phase_images
        next_fade = phase + 1 if phase % 2 == 0 else phase + 2  # phases 1, 3, 5, ... start a new resolution
        return next_fade * self.phase_images

    def advance(self, images: int, g_steps: int) -> int:
        """The count after ``g_steps`` generator steps from ``images``."""
        while g_steps > 0:
            resolution = self.stage(images)[0]
            per_step = self.d_steps_per_g * self.batch(resolution)
            steps = g_steps
            if resolution < self.resolution:
                steps = min(steps, -(-(self._resolution_starts(images) - images) // per_step))
            images += steps * per_step
            g_steps -= steps
        return images

    def steps_until(self, target: int, images: int = 0) -> int:
        """Generator steps from ``images`` until the count reaches ``target``."""
        steps = 0
        while images < target:
            resolution = self.stage(images)[0]
            per_step = self.d_steps_per_g * self.batch(resolution)
            end = target if resolution == self.resolution else min(target, self._resolution_starts(images))
            n = -(-(end - images) // per_step)
            images += n * per_step
            steps += n
        return steps

    @property
    def steps_to_finish(self) -> int:
        """Generator steps of a complete run: through the final resolution's stable phase."""
        return self.steps_until(self.total_images)

    def describe(self, images: int) -> str:
        resolution, alpha = self.stage(images)
        return f"{resolution} px" + (f" fading in at alpha {alpha:.2f}" if alpha < 1 else "")


def check_run_length(cfg: Config) -> None:
    """Refuse a ProGAN run that would stop before the stable phase of its final resolution, in one line that gives
    the length the schedule needs and the phase length that fits the run as configured."""
    schedule = GrowthSchedule.of(cfg)
    if schedule is None:
        return
    f = cfg.federated
    steps, setting = ((f.rounds * f.local_steps, f"federated.rounds × federated.local_steps = {f.rounds} × "
                       f"{f.local_steps}") if f.enabled else (cfg.train.steps, f"train.steps = {cfg.train.steps}"))
    needed = schedule.steps_to_finish
    if steps >= needed:
        return
    fix = f"raise federated.rounds to {-(-needed // f.local_steps)}" if f.enabled else f"set train.steps={needed}"
    fitting = fitting_kimg_per_phase(schedule, steps)
    if fitting is not None:
        fix += f", or shorten the phases to fit with train.kimg_per_phase={fitting:g}"
    raise UserError(
        f"{setting} generator steps stop ProGAN at {schedule.describe(schedule.advance(0, steps))}, before its "
        f"{schedule.resolution}-px stable phase, which the schedule reaches after {needed} steps: {fix}"
    )


def fitting_kimg_per_phase(schedule: GrowthSchedule, steps: int) -> float | None:
    """The longest phase in kimg (3 significant digits) with which the whole schedule fits in ``steps`` generator
    steps; None when not even one-image phases fit."""

    def fits(kimg: float) -> bool:
        phase = max(1, round(kimg * 1000))
        return replace(schedule, phase_images=phase).steps_to_finish <= steps

    if not fits(0.001):
        return None
    kimg = schedule.phase_images / 1000 * steps / schedule.steps_to_finish
    while not fits(rounded := float(f"{kimg:.3g}")):
        kimg = rounded * 0.99
    return max(rounded, 0.001)
