"""ProGAN's growth: the schedule by hand and against a step-by-step count, every preset reaching its resolution, the
public image count, per-resolution batches, Adam resets at new layers, one-line refusals, and a short run whose
`generate` writes 64-px images."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest
import torch
from PIL import Image

from medsyngan.config import PRESETS, config_from_toml_text, load_config, preset_names
from medsyngan.errors import UserError
from medsyngan.training.checkpoint import load_checkpoint
from medsyngan.training.schedule import GrowthSchedule, check_run_length, progan_stage
from medsyngan.training.step import GANTrainer

TINY = ["run.device=cpu", "model.arch=progan", "model.fmap_base=32", "model.fmap_max=8", "model.z_dim=8",
        "model.resolution=16", "data.size=16", "train.loss=wgan-gp", "train.batch_size=4"]


def tiny(*extra: str):
    return load_config(None, [*TINY, *extra])


def batches(size: int, batch: int = 4):
    gen = torch.Generator().manual_seed(0)
    return lambda: torch.rand(batch, 1, size, size, generator=gen) * 2 - 1


# --- the schedule ---------------------------------------------------------------------------------------------


def test_stages_by_hand():
    p = 10_000
    assert progan_stage(0, p, 64) == (4, 1.0)
    assert progan_stage(9_999, p, 64) == (4, 1.0)
    assert progan_stage(10_000, p, 64) == (8, 0.0)
    assert progan_stage(12_500, p, 64) == (8, 0.25)
    assert progan_stage(20_000, p, 64) == (8, 1.0)
    assert progan_stage(35_000, p, 64) == (16, 0.5)
    assert progan_stage(79_999, p, 64) == (64, 0.9999)
    assert progan_stage(80_000, p, 64) == (64, 1.0)
    assert progan_stage(10**9, p, 64) == (64, 1.0)
    schedule = GrowthSchedule(64, p, 16)
    assert schedule.total_images == 90_000  # 4 px, then a fade-in and a stable phase for each of 8, 16, 32, 64


def _count_by_steps(schedule: GrowthSchedule, g_steps: int) -> int:
    """The trainer's count, one generator step at a time: d_steps_per_g D steps at the stage of the step's start."""
    images = 0
    for _ in range(g_steps):
        images += schedule.d_steps_per_g * schedule.batch(schedule.stage(images)[0])
    return images


@pytest.mark.parametrize("schedule", [
    GrowthSchedule(64, 100, 16), GrowthSchedule(32, 70, 4, 2, {4: 32, 8: 12, 32: 8}), GrowthSchedule(8, 1, 3)])
def test_advance_and_steps_until_agree_with_counting_step_by_step(schedule):
    for start in (0, 37, schedule.total_images // 2):
        for steps in (0, 1, 5, 23, 200):
            start_count = _count_by_steps(schedule, start)
            assert schedule.advance(start_count, steps) == _count_by_steps(schedule, start + steps)
    finish = schedule.steps_to_finish
    assert _count_by_steps(schedule, finish) >= schedule.total_images > _count_by_steps(schedule, finish - 1)


PROGAN_PRESETS = [n for n in preset_names() if load_config(n).model.arch == "progan"]


@pytest.mark.parametrize("name", PROGAN_PRESETS)
def test_every_progan_preset_ends_at_its_resolution_after_a_stable_phase_there(name):
    cfg = load_config(name)
    schedule = GrowthSchedule.of(cfg)
    end = schedule.advance(0, cfg.train.steps)
    stable_from = 2 * schedule.doublings * schedule.phase_images  # the final resolution's stable phase starts here
    assert schedule.stage(end) == (cfg.model.resolution, 1.0)
    assert end - stable_from >= schedule.phase_images
    assert cfg.train.steps == schedule.steps_to_finish  # and no longer: the presets stop when the schedule ends
    check_run_length(cfg)


def test_paper_phases_are_the_default_and_the_cpu_preset_is_shorter():
    assert load_config(None).train.kimg_per_phase == 600
    assert load_config("progan64").train.kimg_per_phase == 600
    assert load_config("progan64-short").train.kimg_per_phase < 600


def test_a_file_written_before_the_paper_default_keeps_its_phase_length():
    old = 'version = 2\n[model]\narch = "progan"\n[train]\nloss = "wgan-gp"\n'
    assert config_from_toml_text(old, "old file").train.kimg_per_phase == 60
    assert config_from_toml_text(old.replace("version = 2", "version = 3"), "new").train.kimg_per_phase == 600


# --- run length ------------------------------------------------------------------------------------------------


def test_a_run_that_stops_before_its_final_resolution_is_one_line_with_both_fixes():
    cfg = load_config("progan64", ["train.steps=1000"])
    with pytest.raises(UserError) as err:
        check_run_length(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert "train.steps = 1000 generator steps stop ProGAN at 4 px" in message
    assert f"set train.steps={GrowthSchedule.of(cfg).steps_to_finish}" in message
    fitting = message.rsplit("train.kimg_per_phase=", 1)[1]
    check_run_length(load_config("progan64", ["train.steps=1000", f"train.kimg_per_phase={fitting}"]))


def test_a_federation_too_short_for_the_schedule_is_refused():
    cfg = load_config("progan64-short", ["federated.enabled=true", "federated.rounds=2", "federated.local_steps=10"])
    with pytest.raises(UserError, match=r"federated\.rounds × federated\.local_steps = 2 × 10 .* raise federated\.rounds"):
        check_run_length(cfg)


def test_families_that_do_not_grow_have_no_schedule():
    assert GrowthSchedule.of(load_config("dcgan64")) is None
    check_run_length(load_config("dcgan64", ["train.steps=1"]))


# --- the trainer's count, stages and batches --------------------------------------------------------------------


def test_the_trainer_grows_at_the_scheduled_count():
    # 4 images per step and 8 images per phase: 2 steps per phase.
    trainer = GANTrainer(tiny("train.kimg_per_phase=0.008"))
    stages = []
    for _ in range(8):
        trainer.train_step(batches(16))
        stages.append((trainer.G.stage_resolution, round(trainer.G.alpha, 3), trainer.D.stage_resolution))
    assert stages == [(4, 1.0, 4), (8, 0.0, 8), (8, 0.5, 8), (8, 1.0, 8), (8, 1.0, 8), (16, 0.0, 16),
                      (16, 0.5, 16), (16, 1.0, 16)]
    # Reals follow the stage: downsampled to 16 px at full resolution, a blend during fade-in.
    assert trainer.prepare_real(torch.zeros(2, 1, 16, 16)).shape == (2, 1, 16, 16)


def test_the_count_is_the_configured_batch_whatever_size_a_batch_has():
    """A DP-SGD batch is a Poisson sample whose size is private: the count, and so the stage, must not follow it."""
    trainer = GANTrainer(tiny("train.kimg_per_phase=0.008", "train.d_steps_per_g=2"))
    sizes = iter([1, 7, 3, 9, 2, 5, 4, 6] * 4)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 9):
        trainer.train_step(lambda: torch.rand(next(sizes), 1, 16, 16, generator=gen) * 2 - 1)
        assert trainer.images_seen == step * 2 * 4
        assert trainer.stage == trainer.growth.stage(trainer.images_seen)


def test_a_stage_batch_is_drawn_as_several_loader_batches():
    trainer = GANTrainer(tiny("train.kimg_per_phase=0.024", "train.batch_by_resolution={4 = 12, 8 = 8}"))
    drawn, fakes = [], []
    original = trainer.generate
    trainer.generate = lambda n, c=None: (fakes.append(n), original(n, c))[1]
    source = batches(16)

    def next_real():
        drawn.append(trainer.stage[0])
        return source()

    seen = []
    for _ in range(9):
        trainer.train_step(next_real)
        seen.append(trainer.images_seen)
    # Phases of 24 images. 4 px: 12 per step (3 loader batches); 8 px, faded in and stable: 8 (2); 16 px: 4.
    assert seen == [12, 24, 32, 40, 48, 56, 64, 72, 76]
    assert drawn == [4] * 6 + [8] * 12 + [16]
    assert fakes == [12, 12, 8, 8, 8, 8, 8, 8, 4]


def _adam_steps(trainer: GANTrainer) -> tuple[int, int]:
    """Adam's step count of a parameter every stage trains (G's input layer, D's output layer); 0 after a reset."""
    g, d = trainer.G.blocks["4"].dense.weight, trainer.D.output.out.weight
    return tuple(int(opt.state[p]["step"]) if p in opt.state else 0 for opt, p in ((trainer.opt_g, g),
                                                                                    (trainer.opt_d, d)))


def test_adam_moments_reset_when_new_layers_fade_in_and_when_the_fade_in_ends():
    trainer = GANTrainer(tiny("train.kimg_per_phase=0.008"))
    trace = []
    for _ in range(9):
        trainer.train_step(batches(16))
        trace.append((trainer.stage, _adam_steps(trainer)))
    # Each phase is two steps; the stage read after a step is the one the next step trains.
    assert trace == [((4, 1.0), (1, 1)), ((8, 0.0), (0, 0)), ((8, 0.5), (1, 1)), ((8, 1.0), (0, 0)),
                     ((8, 1.0), (1, 1)), ((16, 0.0), (0, 0)), ((16, 0.5), (1, 1)), ((16, 1.0), (0, 0)),
                     ((16, 1.0), (1, 1))]


def test_resuming_or_loading_weights_resets_nothing():
    trainer = GANTrainer(tiny("train.kimg_per_phase=0.008"))
    for _ in range(3):
        trainer.train_step(batches(16))
    state = trainer.state_dict()
    again = GANTrainer(tiny("train.kimg_per_phase=0.008"))
    again.load_state_dict(state)
    assert again.stage == trainer.stage == (8, 0.5) and _adam_steps(again) == _adam_steps(trainer) == (1, 1)
    again.load_model_state(trainer.model_state(("G", "D")))
    assert _adam_steps(again) == (1, 1)


def test_keep_stage_samples_at_the_stage_the_weights_carry():
    grown = GANTrainer(tiny())
    grown.set_images_seen(grown.growth.total_images)
    fresh = GANTrainer(tiny())
    fresh.load_model_state(grown.model_state(("G",)), keep_stage=True)
    assert fresh.stage == (16, 1.0) and fresh.G.stage_resolution == 16
    fresh.load_model_state(grown.model_state(("G",)))
    assert fresh.stage == (4, 1.0)  # without it the trainer's own count decides


@pytest.mark.parametrize("overrides, message", [
    (["model.arch=dcgan", "train.batch_by_resolution={4 = 8}"], "sets ProGAN's batch per stage"),
    (["train.batch_by_resolution={4 = 6}"], "not a multiple of train.batch_size"),
    (["train.batch_by_resolution={32 = 8}"], "not a stage of a 16-px ProGAN"),
    (["train.batch_by_resolution={4 = 8}", "privacy.dp=true", "model.dp_compatible=true"], "DP-SGD's sampling rate"),
])
def test_bad_per_resolution_batches_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message) as err:
        load_config(None, [*TINY, *overrides])
    assert "\n" not in str(err.value)


def test_presets_document_their_batches_in_a_map_the_schema_accepts():
    for name in PROGAN_PRESETS:
        text = (PRESETS / f"{name}.toml").read_text()
        batches_ = tomllib.loads(text)["train"].get("batch_by_resolution", {})
        cfg = load_config(name)
        assert {int(k): v for k, v in batches_.items()} == cfg.train.batch_by_resolution


# --- a short run end to end ------------------------------------------------------------------------------------

SHORT = ["model.fmap_base=128", "model.fmap_max=8", "model.z_dim=8", "train.kimg_per_phase=0.128",
         "data.phantom_patients=12", "data.phantom_images_per_patient=2", "run.threads=1", "train.log_every=1"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medsyngan.cli", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_generate_after_a_short_run_of_the_short_preset_writes_64_px_images(tmp_path, medsyngan_cache):
    steps = GrowthSchedule.of(load_config("progan64-short", SHORT)).steps_to_finish
    out = tmp_path / "run"
    overrides = [*SHORT, f"train.steps={steps}", f"train.checkpoint_every={steps}", f"train.sample_every={steps}"]
    done = _cli("train", "--config", "progan64-short", "--out", str(out), *[a for o in overrides for a in ("--set", o)])
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = load_checkpoint(out)
    assert (ckpt.meta["stage_resolution"], ckpt.meta["alpha"]) == (64, 1.0)
    generated = _cli("generate", "--run", str(out), "--count", "3", "--out", str(tmp_path / "png"))
    assert generated.returncode == 0, generated.stderr[-2000:]
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 3 and all(Image.open(p).size == (64, 64) for p in pngs)
    stages = [json.loads(row)["stage_resolution"] for row in (out / "metrics.jsonl").read_text().splitlines()]
    assert stages == sorted(stages) and stages[0] == 4 and stages[-1] == 64


def test_a_short_stop_is_refused_in_one_line(tmp_path, medsyngan_cache):
    done = _cli("train", "--config", "progan64-short", "--out", str(tmp_path / "run"), "--steps", "5")
    assert done.returncode != 0
    assert "stop ProGAN at 4 px" in done.stderr and "Traceback" not in done.stderr
