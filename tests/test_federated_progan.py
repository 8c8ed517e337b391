"""A federated ProGAN grows on the server's schedule: the round instruction carries the stage, every hospital trains
it in lockstep (under DP too, whatever size its Poisson batches have; a class-conditional model too), the stage is
never averaged or quantized, and the server's checkpoints and sample grids are at the resolution reached."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medsyngan.config import load_config
from medsyngan.data.labels import LabelLayout
from medsyngan.federated import protocol as p
from medsyngan.federated.client_app import make_client_app
from medsyngan.federated.server import RoundDriver
from medsyngan.rundir import RunDir
from medsyngan.training.checkpoint import load_checkpoint
from medsyngan.training.generate import generate_images, load_generator
from medsyngan.training.schedule import GrowthSchedule
from medsyngan.workflows.federation import prepare_job, simulation_identity_key
from federation_settings import WITHOUT_DP
from test_federated_rounds import LoopbackGrid, server_task  # noqa: F401 - the fixture stamps instructions

# 64 px from 4 px: 9 phases of 8 images at batch 4, two generator steps each; 6 rounds of 3 steps.
PROGAN = ["run.device=cpu", "run.threads=1", "model.arch=progan", "model.resolution=64", "data.size=64",
          "model.fmap_base=128", "model.fmap_max=8", "model.z_dim=8", "train.loss=hinge", "train.lr_g=1e-3",
          "train.lr_d=1e-3", "train.beta1=0", "train.beta2=0.99", "train.batch_size=4", "train.kimg_per_phase=0.008",
          "train.ema_kimg=0.05", "data.phantom_patients=30", "data.phantom_images_per_patient=2",
          "federated.rounds=6", "federated.local_steps=3", "federated.eval_every=6", "federated.holdout_fraction=0",
          "federated.round_retries=0"]


def _run(tmp_path, overrides: list[str]) -> RunDir:
    cfg = load_config("federated-dcgan64", [*PROGAN, *overrides])
    run_dir = RunDir(tmp_path / "run").create(cfg)
    job = prepare_job(cfg, run_dir, resume=False, simulation=True)
    RoundDriver(cfg, run_dir, job, False, simulation_identity_key(cfg, run_dir)).run(
        LoopbackGrid(make_client_app(lambda fake, holdout: {}), 3))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("private, conditional", [(False, False), (True, False), (True, True)],
                         ids=["secure 8-bit", "DP-SGD, secure 8-bit", "conditional, DP-SGD, secure 8-bit"])
def test_a_federated_progan_reaches_64_px_with_every_hospital_in_lockstep(tmp_path, medsyngan_cache, private,
                                                                           conditional):
    overrides = (["privacy.dp=true", "privacy.target_epsilon=8", "hospital.max_epsilon=8"] if private
                 else [*WITHOUT_DP])
    if conditional:
        overrides.append("model.condition=['findings', 'view']")
    run_dir = _run(tmp_path, overrides)
    cfg = run_dir.load_config()
    schedule = GrowthSchedule.of(cfg)
    rows = [r for r in run_dir.read_metrics() if "hospital" in r]
    assert [r["hospitals_replied"] for r in rows] == [[0, 1, 2]] * 6
    images = 0
    for row in rows:
        images = schedule.advance(images, cfg.federated.local_steps)
        expected = schedule.stage(images)
        reported = {(h["stage_resolution"], h["alpha"]) for h in row["hospital"].values()}
        assert reported == {expected} and (row["stage_resolution"], row["alpha"]) == expected
    assert expected == (64, 1.0)
    assert ("epsilon" in rows[-1]) == private

    ckpt = load_checkpoint(run_dir.root)
    assert (ckpt.meta["stage_resolution"], ckpt.meta["alpha"]) == (64, 1.0)
    assert ckpt.meta["schedule_images"] == images == schedule.total_images
    for part in ("G", "D", "G_ema"):
        assert int(ckpt.tensors[f"{part}.stage_res"]) == 64 and float(ckpt.tensors[f"{part}.stage_alpha"]) == 1.0
    G, _ = load_generator(run_dir.root)
    # A federation's conditional G records no label frequencies (each hospital drew its own): labels are given.
    labels = torch.from_numpy(LabelLayout.of(cfg.model.condition).encode(["Effusion"], "PA")) if conditional else None
    assert (getattr(G, "c_dim", 0) > 0) == conditional
    assert generate_images(G, 2, seed=0, labels=labels).shape == (2, 64, 64)
    grid = Image.open(sorted(run_dir.samples.glob("round-*.png"))[-1])
    assert grid.size == (8 * (64 + 2) + 2,) * 2  # 8 × 8 images of 64 px, 2 px apart


def test_the_round_instruction_carries_the_stage_and_the_server_does_not_average_it(tmp_path, medsyngan_cache):
    growth = p.Growth(images=1234, resolution=16, alpha=0.375)
    instruction = p.RoundInstruction(3, 2, growth=growth)
    assert p.RoundInstruction.from_record(instruction.to_record()) == instruction
    assert p.RoundInstruction.from_record(p.RoundInstruction(3, 2).to_record()).growth is None
    with pytest.raises(p.MalformedMessage, match="growth.alpha"):
        p.RoundInstruction.from_record({**instruction.to_record(), "growth.alpha": "half"})

    cfg = load_config("federated-dcgan64", [*PROGAN, *WITHOUT_DP])
    run_dir = RunDir(tmp_path / "run").create(cfg)
    driver = RoundDriver(cfg, run_dir, prepare_job(cfg, run_dir, resume=False, simulation=True), False,
                         simulation_identity_key(cfg, run_dir))
    assert not [k for k in driver.shared_state() if "stage_" in k]
    sent = driver.instructions(1, [0, 1])
    assert {i.growth for i in sent.values()} == {p.Growth(0, 4, 1.0)}


def test_a_hospital_whose_schedule_disagrees_with_the_server_refuses_the_round(tmp_path, medsyngan_cache):
    from medsyngan.data.api import load_training_data
    from medsyngan.errors import UserError
    from medsyngan.federated.hospital import Hospital

    cfg = load_config("federated-dcgan64", [*PROGAN, *WITHOUT_DP])
    data = load_training_data(cfg)
    hospital = Hospital(cfg, 0, data.subset(np.arange(8)))
    weights = {k: v for k, v in hospital.trainer.model_state(("G", "D")).items() if "stage_" not in k}
    result = hospital.train_round(weights, 1, growth=(8, 8, 0.0))  # fade-in of 8 px starts at 8 images
    assert result.metrics["stage_resolution"] == 8 and result.metrics["alpha"] == 0.5
    with pytest.raises(UserError, match="run the same MedSynGAN version"):
        hospital.train_round(weights, 1, growth=(8, 8, 0.25))


def test_the_servers_fade_in_alpha_is_its_schedules_own_and_the_hospitals_accept_it(tmp_path, medsyngan_cache):
    # Phases of 7 images: fade-in alphas such as 5/7 are not float32 numbers, which the networks' stage buffers are.
    from medsyngan.data.api import load_training_data
    from medsyngan.federated.hospital import Hospital

    cfg = load_config("federated-dcgan64", [*PROGAN, *WITHOUT_DP, "train.kimg_per_phase=0.007"])
    run_dir = RunDir(tmp_path / "run").create(cfg)
    driver = RoundDriver(cfg, run_dir, prepare_job(cfg, run_dir, resume=False, simulation=True), False,
                         simulation_identity_key(cfg, run_dir))
    schedule = GrowthSchedule.of(cfg)
    while (alpha := schedule.stage(driver.state.schedule_images)[1]) == torch.tensor(alpha).item():
        driver.state.advance_growth(cfg)
    (growth,) = {i.growth for i in driver.instructions(1, [0, 1]).values()}
    assert (growth.resolution, growth.alpha) == schedule.stage(growth.images)
    hospital = Hospital(cfg, 0, load_training_data(cfg).subset(np.arange(8)))
    weights = {k: v for k, v in driver.state.global_state.items() if k.split(".", 1)[0] in ("G", "D")}
    result = hospital.train_round(weights, 1, growth=(growth.images, growth.resolution, growth.alpha))
    assert result.metrics["stage_resolution"] == growth.resolution
