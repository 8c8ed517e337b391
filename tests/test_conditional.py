"""Class-conditional networks and training: labels reach G and D per sample, per-sample gradients with labels
match a loop under every DP engine, real batches carry their own labels (shuffled loader and Poisson sampler),
generated batches draw theirs from the label source, and the private release of label frequencies is accounted."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medsyngan.config import load_config
from medsyngan.data.labels import JointLabels, LabelLayout, MarginalLabels
from medsyngan.data.loader import BatchLoader
from medsyngan.errors import UserError
from medsyngan.models.registry import build_discriminator, build_generator
from medsyngan.privacy.accounting import combined_noise, one_off_release
from medsyngan.privacy.engines import make_engine
from medsyngan.privacy.label_release import clip_bound, release_label_frequencies
from medsyngan.privacy.sampling import PoissonUnitSampler
from medsyngan.training.step import GANTrainer, conditioned
from tiny_dp import SIZE, enable_dp_from, random_images, tiny_cfg

CONDITION = "model.condition=['findings', 'view', 'sex', 'age']"
LAYOUT = LabelLayout.of(["findings", "view", "sex", "age"])
STYLE = ["model.fmap_base=64", "model.fmap_max=8", "train.r1_gamma=0", "train.loss=nonsaturating"]
# StyleGAN3 starts at 64 px; a few narrow layers keep it quick.
SG3 = ["model.resolution=64", "data.size=64", "model.fmap_base=128", "model.fmap_max=16", "model.w_dim=16",
       "model.sg3_layers=3"]


def _cfg(arch: str = "dcgan", *extra: str):
    extra = (*(STYLE if arch != "dcgan" else []), *(SG3 if arch == "stylegan3" else []), *extra)
    return tiny_cfg(f"model.arch={arch}", CONDITION, *extra)


def _labels(n: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    rows = [LAYOUT.encode([f for f in ("Effusion", "Mass") if rng.random() < 0.4], rng.choice(["PA", "AP"]),
                          rng.choice(["F", "M"]), int(rng.integers(10, 90))) for _ in range(n)]
    return torch.from_numpy(np.stack(rows))


@pytest.mark.parametrize("arch", ["dcgan", "progan", "stylegan2", "stylegan3"])
def test_conditional_networks_use_each_sample_s_own_labels(arch):
    cfg = _cfg(arch)
    torch.manual_seed(0)
    G, D = build_generator(cfg.model).eval(), build_discriminator(cfg.model)
    assert G.c_dim == D.c_dim == LAYOUT.dim and G.label_groups == LAYOUT.groups
    z, c = torch.randn(3, cfg.model.z_dim), _labels(3)
    x = G(z, c=c)
    assert x.shape == (3, 1, cfg.model.resolution, cfg.model.resolution)
    other = c.clone()
    other[1] = 1.0 - other[1]
    y = G(z, c=other)
    assert torch.allclose(x[0], y[0]) and not torch.allclose(x[1], y[1])  # labels matter, per sample
    logits = D(x.detach(), c)
    changed = D(x.detach(), other)
    assert logits.shape == (3,) and torch.allclose(logits[0], changed[0]) and not torch.allclose(logits[1], changed[1])
    with pytest.raises(ValueError, match=r"needs labels of shape \(3, 22\), got none"):
        D(x.detach())


@pytest.mark.parametrize("arch", ["dcgan", "progan", "stylegan2", "stylegan3"])
def test_an_unconditional_model_builds_no_label_parameters(arch):
    cfg = tiny_cfg(f"model.arch={arch}", *(STYLE if arch != "dcgan" else []), *(SG3 if arch == "stylegan3" else []))
    for build in (build_generator, build_discriminator):
        torch.manual_seed(0)
        names = [n for n, _ in build(cfg.model).named_parameters()]
        assert not any("embed" in n or n.startswith("mapping.") and build is build_discriminator for n in names)
    assert build_generator(cfg.model).c_dim == 0


def _grads(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _loop_reference(trainer, real, real_c, fake, fake_c, clip, expected):
    """Σ_i clip(∇ real loss_i of (real[i], real_c[i])) / expected + mean fake gradient, one backward per sample."""
    params = [p for p in trainer.D.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(real.shape[0]):
        g = _grads(trainer.d_real_loss(conditioned(trainer.D, real_c[i:i + 1]), real[i:i + 1])[0], params)
        factor = min(1.0, clip / (torch.sqrt(sum(x.square().sum() for x in g)).item() + 1e-6))
        total = [t + x * factor / expected for t, x in zip(total, g)]
    fake_g = _grads(trainer.d_fake_loss(conditioned(trainer.D, fake_c), fake).mean(), params)
    return params, [t + f for t, f in zip(total, fake_g)]


@pytest.mark.parametrize("arch,engine", [("dcgan", "ghost"), ("dcgan", "vmap"), ("dcgan", "loop"),
                                         ("progan", "ghost"), ("stylegan2", "ghost"), ("stylegan2", "vmap")])
def test_per_sample_gradients_with_labels_match_a_per_example_loop(arch, engine):
    trainer = GANTrainer(_cfg(arch), device="cpu")
    real = trainer.prepare_real(torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    real_c, fake_c = _labels(3, 1), _labels(2, 2)
    fake = trainer.generate(2, fake_c)[0].detach()
    eng = make_engine(trainer, engine)
    assert eng.name == engine
    params = [p for p in trainer.D.parameters() if p.requires_grad]
    norms = sorted(torch.sqrt(sum(g.square().sum() for g in _grads(
        trainer.d_real_loss(conditioned(trainer.D, real_c[i:i + 1]), real[i:i + 1])[0], params))).item()
        for i in range(3))
    clip = norms[1]  # between the per-sample norms: one sample clipped, one not
    grads, _ = eng.gradients(trainer, real, fake, clip, 5.0, real_c=real_c, fake_c=fake_c)
    params, expected = _loop_reference(trainer, real, real_c, fake, fake_c, clip, 5.0)
    embed = [p for n, p in trainer.D.named_parameters() if "embed" in n]
    assert embed and any(grads[p].abs().sum() > 0 for p in embed)  # the label path gets its gradient
    for p, ref in zip(params, expected):
        torch.testing.assert_close(grads.get(p, torch.zeros_like(p)), ref, rtol=1e-4, atol=1e-6)


def _indexed_images(n: int) -> np.ndarray:
    """Image i is filled with the value i, so that a batch tells which rows it holds."""
    return np.repeat(np.arange(n, dtype=np.uint8)[:, None, None], SIZE * SIZE, axis=1).reshape(n, SIZE, SIZE)


def _rows(x: torch.Tensor) -> list[int]:
    return [round((v + 1) * 127.5) for v in x[:, 0, 0, 0].tolist()]


def test_the_loader_returns_each_image_with_its_own_labels():
    labels = np.arange(40, dtype=np.float32)[:, None].repeat(3, 1)
    loader = BatchLoader(_indexed_images(40), 8, seed=2, labels=labels)
    for _ in range(7):  # across an epoch boundary
        x, c = next(loader)
        assert c.shape == (8, 3) and _rows(x) == c[:, 0].int().tolist()
    plain = next(BatchLoader(_indexed_images(40), 8, seed=2))
    assert isinstance(plain, torch.Tensor)


def test_the_poisson_sampler_returns_each_sampled_image_with_its_own_labels():
    patients = np.array([f"p{i // 3}" for i in range(60)])
    labels = np.arange(60, dtype=np.float32)[:, None]
    sampler = PoissonUnitSampler(_indexed_images(60), patients, 6, "patient", seed=4, labels=labels)
    plain = PoissonUnitSampler(_indexed_images(60), patients, 6, "patient", seed=4)
    for _ in range(5):
        x, c = sampler()
        assert _rows(x) == c[:, 0].int().tolist() and torch.equal(x, plain())


def test_a_conditional_trainer_draws_generated_labels_from_its_source_and_passes_real_ones_to_d():
    trainer = GANTrainer(_cfg(), device="cpu")
    loader = BatchLoader(random_images(40), 8, seed=0, labels=_labels(40).numpy())
    with pytest.raises(UserError, match="label source"):
        trainer.train_step(loader.__next__)
    views = LAYOUT.encode([], "AP", "F", 70)[None].repeat(5, 0)
    trainer.set_label_source(JointLabels.count(LAYOUT, views))  # every generated image is an AP film
    seen = []
    D = trainer.D
    trainer.D = lambda x, c=None: seen.append(c) or D(x, c)  # noqa: E731
    trainer.d_update.step = lambda t, real, fake, real_c=None, fake_c=None: seen.extend(["D", real_c, fake_c]) or {}
    trainer.train_step(loader.__next__)
    _, real_c, fake_c, g_step = seen
    assert real_c.shape == (8, LAYOUT.dim) and fake_c.shape == (8, LAYOUT.dim)
    assert torch.all(fake_c == torch.from_numpy(views[0])) and torch.equal(g_step, fake_c)
    with pytest.raises(UserError, match="labelled real batches"):
        trainer.train_step(lambda: torch.zeros(8, 1, SIZE, SIZE))
    other = LabelLayout.of(["view"])
    with pytest.raises(UserError, match="model.condition"):
        trainer.set_label_source(JointLabels.count(other, np.eye(2, dtype=np.float32)))


def test_the_label_rng_is_part_of_the_trainer_state():
    cfg = _cfg()
    source = MarginalLabels(LAYOUT, np.full(LAYOUT.dim, 0.2))
    a, b = GANTrainer(cfg, device="cpu"), GANTrainer(cfg, device="cpu")
    for t in (a, b):
        t.set_label_source(source)
    a.fake_labels(5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.fake_labels(7), b.fake_labels(7))


def test_the_private_label_release_has_the_documented_noise_and_clipping():
    layout = LabelLayout.of(["findings", "view"])
    labels = np.zeros((4000, layout.dim), np.float32)
    labels[:, 14] = 1.0  # every film PA
    labels[:1000, :3] = 1.0  # a quarter of the films with three findings: their units are clipped to √(1 + 2)
    released = [release_label_frequencies(labels, None, layout, 2.0, torch.Generator().manual_seed(s)).probs
                for s in range(300)]
    probs = np.stack(released)
    assert clip_bound(layout) == pytest.approx(math.sqrt(3))
    # Σ of clipped contributions: 1000 units of norm 2 (three findings + view) scaled to √3, each component √3/2.
    assert probs[:, 0].mean() == pytest.approx(1000 * math.sqrt(3) / 2 / 4000, abs=0.002)
    noise_std = 2.0 * math.sqrt(3) / 4000
    assert probs[:, 5].std() == pytest.approx(noise_std * math.sqrt(0.5 * (1 - 1 / math.pi)), rel=0.2)  # clamped at 0
    assert probs[:, 14].mean() == pytest.approx(1 - 1000 * (1 - math.sqrt(3) / 2) / 4000, abs=0.003)
    assert np.all(probs[:, 14:16].sum(1) <= 1 + 1e-9) and np.all(probs >= 0)


@pytest.mark.slow
def test_a_private_conditional_run_pays_for_its_label_release_up_front_and_keeps_it():
    cfg = _cfg("dcgan", "privacy.dp=true", "privacy.target_epsilon=8", "privacy.label_noise=4",
               "privacy.mean_image_size=4", "privacy.mean_image_noise=3")
    images, patients, labels = random_images(60), np.array([f"p{i // 2}" for i in range(60)]), _labels(60).numpy()
    trainer = GANTrainer(cfg, device="cpu")
    session = enable_dp_from(cfg, trainer, images, patients, planned_steps=20, seed=5, labels=labels)
    sigma = combined_noise(3.0, 4.0)
    assert sigma == pytest.approx((1 / 9 + 1 / 16) ** -0.5)
    assert session.accountant.history == [one_off_release(sigma)] and session.steps == 0
    released = trainer.label_source
    assert isinstance(released, MarginalLabels) and session.summary()["label_noise"] == 4.0
    trainer.train_step(session.next_real)
    assert session.accountant.history[1:] == [(session.noise_multiplier, session.sample_rate, 1)]
    state = session.state_dict()
    again = GANTrainer(cfg, device="cpu")
    enable_dp_from(cfg, again, images, patients, planned_steps=20, seed=6, labels=labels, state=state)
    assert np.array_equal(again.label_source.probs, released.probs)  # read back, not drawn again


def test_public_label_frequencies_cost_no_privacy(tmp_path):
    table = tmp_path / "Data_Entry_2017_v2020.csv"
    table.write_text("Image Index,Finding Labels,Patient ID,Patient Age,Patient Gender,View Position\n"
                     "a.png,Effusion,1,50,F,AP\nb.png,No Finding,2,30,M,PA\n")
    cfg = _cfg("dcgan", "privacy.dp=true", "privacy.target_epsilon=8", 'train.label_source="public"',
               f"train.label_table={str(table)!r}")
    trainer = GANTrainer(cfg, device="cpu")
    session = enable_dp_from(cfg, trainer, random_images(60), None, planned_steps=20, seed=5,
                             labels=_labels(60).numpy())
    assert session.accountant.history == [] and session.labels is None
    assert isinstance(trainer.label_source, JointLabels) and len(trainer.label_source.rows) == 2


def test_a_conditional_model_under_dp_needs_the_labels():
    cfg = _cfg("dcgan", "privacy.dp=true", "privacy.target_epsilon=8")
    with pytest.raises(UserError, match="one label vector per training image"):
        enable_dp_from(cfg, GANTrainer(cfg, device="cpu"), random_images(60), None, planned_steps=20, seed=5)


@pytest.mark.slow
def test_the_privacy_plan_says_where_generated_labels_come_from(monkeypatch, capsys, medsyngan_cache):
    from cli_run import run_cli

    code, out, err = run_cli(monkeypatch, capsys, "privacy", "--config", "dcgan64", "--set", CONDITION, "--set",
                             "privacy.dp=true", "--set", "data.phantom_patients=40", "--set", "train.steps=50",
                             "--set", "train.batch_size=8", "--set", "privacy.target_epsilon=5")
    assert code == 0, err
    assert "generated labels (findings, view, sex, age): the training data's label frequencies, released once" in out
    assert "σ = 5" in out


@pytest.mark.slow
def test_a_private_conditional_hospital_releases_its_labels_once_and_evaluates_with_them(medsyngan_cache):
    from medsyngan.data.api import phantom_dataset
    from medsyngan.federated.hospital import Hospital

    data = phantom_dataset(16, 2, 32, seed=4)
    cfg = load_config("federated-dcgan64", [
        "data.size=32", "model.resolution=32", "model.ngf=8", "model.ndf=8", "model.z_dim=16", "train.batch_size=4",
        "run.seed=4", CONDITION, "privacy.dp=true", "privacy.target_epsilon=10", "federated.rounds=2",
        "federated.local_steps=2"])
    train, held = data.subset(range(24)), data.subset(range(24, 32))
    hospital = Hospital(cfg, 0, train, held)
    start = hospital.trainer.model_state(("G", "D"))
    result = hospital.train_round(start, 2)
    assert result.metrics["dp_steps"] == 2
    state = hospital.state_dict()
    assert state["dp"]["labels"]["kind"] == "marginal"
    steps = hospital.dp.accountant.steps
    again = Hospital(cfg, 0, train, held)  # a hospital rebuilt for the next message, from its persisted state
    again.load_state_dict(state)
    metrics = again.evaluate({k: v for k, v in start.items() if k.startswith("G.")}, 6,
                             lambda fake, real: {"fake_images": float(len(fake))})
    assert metrics["fake_images"] == 6
    assert np.array_equal(again.trainer.label_source.probs, hospital.trainer.label_source.probs)
    assert again.dp.accountant.steps == steps  # the release was read back, not made again


def test_the_label_release_is_written_to_the_ledger_before_it_is_made_and_shares_one_charge_with_the_mean_image():
    cfg = _cfg("dcgan", "privacy.dp=true", "privacy.target_epsilon=8", "privacy.label_noise=4",
               "privacy.mean_image_size=4", "privacy.mean_image_noise=3")
    images, patients, labels = random_images(60), np.array([f"p{i // 2}" for i in range(60)]), _labels(60).numpy()
    written = []
    session = enable_dp_from(cfg, GANTrainer(cfg, device="cpu"), images, patients, planned_steps=20, seed=5,
                             labels=labels, ledger=(lambda state: written.append(json.loads(json.dumps(state))),
                                                    "ledger"))
    charged = [one_off_release(combined_noise(3.0, 4.0))]
    assert written[0]["labels"] is None and written[0]["accountant"]["history"] == [list(e) for e in charged]
    assert written[-1]["labels"] is not None and written[-1]["one_off_made"] == ["labels"]
    session.trainer.train_step(session.next_real)  # the mean image is released at the first generator step
    assert session.release.released is not None and session.releases == 1
    assert session.accountant.history[:1] == charged and len(session.accountant.history) == 2
    assert written[-1]["one_off_made"] == ["labels", "mean_image"]
