"""The GAN step: losses against independent formulas, the textbook DCGAN iteration, D improvement on a fixed batch,
EMA arithmetic, lazy-regularization settings, model-state exchange and the DP hook point (ProGAN's schedule:
test_progan.py)."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from medsyngan.config import load_config
from medsyngan.training import losses
from medsyngan.training.step import DiscriminatorUpdate, GANTrainer

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "dcgan": ["model.ngf=4", "model.ndf=4", "model.z_dim=8", "model.resolution=32", "data.size=32"],
    "progan": ["model.arch=progan", "model.fmap_base=32", "model.fmap_max=8", "model.z_dim=8",
               "model.resolution=16", "data.size=16", "train.loss=wgan-gp"],
    "stylegan2": ["model.arch=stylegan2", "model.fmap_base=32", "model.fmap_max=8", "model.z_dim=8",
                  "model.w_dim=8", "model.resolution=16", "data.size=16"],
}


def tiny_cfg(arch: str = "dcgan", *extra: str):
    return load_config(None, ["run.device=cpu", "train.batch_size=4", *TINY[arch], *extra])


def batches(size: int, batch: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return lambda: torch.rand(batch, 1, size, size, generator=gen) * 2 - 1


# --- losses against independent computations ------------------------------------------------------------------


def test_nonsaturating_equals_textbook_bce():
    logits = torch.randn(16, dtype=torch.float64) * 3
    p = torch.sigmoid(logits)
    assert torch.allclose(losses.d_real_terms("nonsaturating", logits), -torch.log(p))
    assert torch.allclose(losses.d_fake_terms("nonsaturating", logits), -torch.log(1 - p))
    assert torch.allclose(losses.g_terms("nonsaturating", logits), -torch.log(p))


def test_wgan_and_hinge_terms():
    l = torch.tensor([-2.0, 0.5, 3.0])
    assert torch.allclose(losses.d_real_terms("wgan-gp", l, drift=0.1), -l + 0.1 * l**2)
    assert torch.allclose(losses.d_fake_terms("wgan-gp", l), l)
    assert torch.allclose(losses.d_real_terms("hinge", l), torch.tensor([3.0, 0.5, 0.0]))
    assert torch.allclose(losses.d_fake_terms("hinge", l), torch.tensor([0.0, 1.5, 4.0]))
    assert torch.allclose(losses.g_terms("hinge", l), -l)


def test_gradient_penalties_of_a_linear_critic():
    # D(x) = <w, x>: the input gradient is w everywhere, so GP = (|w| - 1)^2 and R1 = |w|^2 for every sample.
    w = torch.randn(1, 1, 4, 4)
    D = lambda x: (x * w).flatten(1).sum(1)  # noqa: E731
    real, fake = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    gp = losses.gradient_penalty(D, real, fake, torch.rand(3))
    assert torch.allclose(gp, (w.norm() - 1) ** 2 * torch.ones(3))
    assert torch.allclose(losses.r1_penalty(D, real), w.square().sum() * torch.ones(3))


def test_ema_beta_is_a_half_life():
    beta = losses.ema_beta(batch_size=32, ema_kimg=10, images_seen=10**6)
    assert math.isclose(beta ** (10_000 / 32), 0.5, rel_tol=1e-9)
    # Ramp-up caps the half-life at rampup x images seen.
    assert math.isclose(losses.ema_beta(32, 10, 1000, rampup=0.05), 0.5 ** (32 / 50))


# --- the step ------------------------------------------------------------------------------------------------


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_training", REPO / "benchmarks" / "bench_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dcgan_step_is_the_textbook_iteration():
    """Same networks, data and noise: our step and pytorch/examples' loop end with the same weights."""
    bench = _bench_module()
    cfg = tiny_cfg("dcgan", "train.amp=off")  # the textbook loop runs in float32
    trainer = GANTrainer(cfg)
    netG, netD = copy.deepcopy(trainer.G), bench.TextbookD(copy.deepcopy(trainer.D))
    textbook = bench.textbook_loop(netG, netD, cfg.model.z_dim)
    real = batches(32)
    for _ in range(3):
        x = real()
        noise = torch.randn(4, cfg.model.z_dim)
        trainer.latents = lambda n, noise=noise: noise  # type: ignore[method-assign]
        ours = trainer.train_step(lambda: x)
        theirs = textbook(x, noise.view(4, -1, 1, 1))
        assert math.isclose(ours["d_loss"], theirs["d_loss"], rel_tol=1e-4)
        assert math.isclose(ours["g_loss"], theirs["g_loss"], rel_tol=1e-4)
    for mine, ref in [(trainer.G, netG), (trainer.D, netD.body)]:
        for (name, a), b in zip(mine.state_dict().items(), ref.state_dict().values()):
            assert torch.allclose(a.float(), b.float(), atol=1e-5), name


@pytest.mark.parametrize("arch", ["dcgan", "progan", pytest.param("stylegan2", marks=pytest.mark.slow)])
def test_fixed_batch_d_steps_lower_the_d_loss(arch):
    trainer = GANTrainer(tiny_cfg(arch, "train.lr_d=1e-3"))
    size = trainer.prepare_real(torch.zeros(1, 1, trainer.resolution, trainer.resolution)).shape[-1]
    real = batches(size, batch=8)()
    with torch.no_grad():
        fake, _ = trainer.generate(8)

    def d_loss() -> float:
        loss = trainer.d_real_loss(trainer.D, real, fake).mean() + trainer.d_fake_loss(trainer.D, fake).mean()
        return loss.detach().item()

    before = d_loss()
    for _ in range(10):
        trainer.d_update.step(trainer, real, fake)
    assert d_loss() < before - 0.05


def test_ema_update_math():
    cfg = tiny_cfg("dcgan", "train.ema_kimg=0.01")
    trainer = GANTrainer(cfg)
    ema_before = [p.clone() for p in trainer.G_ema.parameters()]
    trainer.train_step(batches(32))
    beta = 0.5 ** (4 / 10)
    for e0, e1, g in zip(ema_before, trainer.G_ema.parameters(), trainer.G.parameters()):
        assert torch.allclose(e1, beta * e0 + (1 - beta) * g, atol=1e-6)
    for b_ema, b in zip(trainer.G_ema.buffers(), trainer.G.buffers()):  # BatchNorm statistics are copied
        assert torch.equal(b_ema, b)


def test_lazy_regularization_adjusts_adam():
    cfg = tiny_cfg("stylegan2", "train.r1_interval=16", "train.pl_interval=4", "train.lr_d=0.0025",
                   "train.beta1=0", "train.beta2=0.99")
    trainer = GANTrainer(cfg)
    c_d, c_g = 16 / 17, 4 / 5
    gd, gg = trainer.opt_d.param_groups[0], trainer.opt_g.param_groups[0]
    assert math.isclose(gd["lr"], 0.0025 * c_d) and math.isclose(gd["betas"][1], 0.99**c_d)
    assert math.isclose(gg["lr"], cfg.train.lr_g * c_g) and math.isclose(gg["betas"][1], 0.99**c_g)
    # DCGAN has no lazy regularizer: Adam is exactly as configured.
    plain = GANTrainer(tiny_cfg("dcgan"))
    assert plain.opt_d.param_groups[0]["lr"] == 2e-4 and plain.opt_d.param_groups[0]["betas"] == (0.5, 0.999)


@pytest.mark.slow
def test_stylegan2_regularizers_run_on_schedule():
    trainer = GANTrainer(tiny_cfg("stylegan2", "train.r1_interval=2", "train.pl_interval=3"))
    seen = [set(trainer.train_step(batches(16))) for _ in range(6)]
    assert [("r1" in s) for s in seen] == [False, True, False, True, False, True]
    assert [("pl" in s) for s in seen] == [False, False, True, False, False, True]
    assert float(trainer.pl_reg.pl_mean) > 0


# --- state exchange and the DP hook point ----------------------------------------------------------------------


def test_model_state_round_trip_between_trainers():
    a = GANTrainer(tiny_cfg("dcgan", "train.ema_kimg=0.01"))
    a.train_step(batches(32))
    b = GANTrainer(tiny_cfg("dcgan", "run.seed=7", "train.ema_kimg=0.01"))
    state = a.model_state(("G", "D"))
    assert all(k.startswith(("G.", "D.")) for k in state) and any(k.startswith("D.") for k in state)
    b.load_model_state(state)
    for key, value in b.model_state(("G", "D", "G_ema")).items():
        source = state[key.replace("G_ema.", "G.", 1)] if key.startswith("G_ema.") else state[key]
        assert torch.equal(value, source), key


def test_discriminator_update_is_replaceable_and_counted():
    class Counting(DiscriminatorUpdate):
        private = True

        def __init__(self):
            self.steps = 0
            self.real_shapes = []

        def step(self, trainer, real, fake, real_c=None, fake_c=None):
            self.steps += 1
            per_sample = trainer.d_real_loss(trainer.D, real, fake)
            self.real_shapes.append(tuple(per_sample.shape))
            out = super().step(trainer, real, fake, real_c, fake_c)
            self.grads = [p.grad.clone() for p in trainer.D.parameters()]
            return out

    update = Counting()
    trainer = GANTrainer(tiny_cfg("dcgan", "train.d_steps_per_g=3"), d_update=update)
    d_params = list(trainer.D.parameters())
    for _ in range(2):
        trainer.train_step(batches(32))
        # The G step leaves D's gradients untouched (D frozen): they are still the last D step's.
        assert all(torch.equal(p.grad, g) for p, g in zip(d_params, update.grads))
        assert all(p.requires_grad for p in d_params)
    assert update.steps == 6 == trainer.d_step
    assert update.real_shapes == [(4,)] * 6
    assert trainer.images_seen == 24 and trainer.step == 2


def test_unsupported_resolution_is_one_line():
    from medsyngan.errors import UserError

    with pytest.raises(UserError, match="not supported by dcgan; use one of: 32, 64, 128, 256"):
        GANTrainer(load_config(None, ["model.resolution=512", "data.size=512"]))


def test_compiled_trainer_keeps_the_plain_state_keys():
    plain = GANTrainer(tiny_cfg("dcgan"))
    compiled = GANTrainer(tiny_cfg("dcgan", "train.compile=true"))
    assert compiled.model_state().keys() == plain.model_state().keys()
    assert all(torch.equal(a, b) for a, b in zip(compiled.model_state().values(), plain.model_state().values()))


def test_frozen_discriminator_layers_stay_put_and_the_head_trains():
    trainer = GANTrainer(tiny_cfg("dcgan", "model.dp_compatible=true", "train.d_trainable_last=2"))
    before = {k: v.clone() for k, v in trainer.D.state_dict().items()}
    real = batches(32)
    for _ in range(2):
        trainer.train_step(real)
    after = trainer.D.state_dict()
    moved = sorted(k for k in before if not torch.equal(before[k], after[k]))
    last_conv = [n for n, m in trainer.D.named_modules() if isinstance(m, torch.nn.Conv2d)][-1] + ".weight"
    # The last two parameterized layers: the last GroupNorm (weight and bias) and the final convolution.
    assert len(moved) == 3 and last_conv in moved
    assert [p.requires_grad for p in trainer.D.parameters()].count(True) == 3


# Each family's output layer, as D's own attribute path (the layer that turns features into the logit).
OUTPUT_LAYER = {"dcgan": "main.8", "progan": "output.out", "stylegan2": "out"}
# Each family's label projection (a conditional D's labels pass through it and never meet the image).
LABEL_PROJECTION = {"dcgan": "embed.", "progan": "output.embed.", "stylegan2": "mapping."}


@pytest.mark.parametrize("arch", ["dcgan", "progan", "stylegan2"])
def test_one_trainable_layer_is_the_output_layer_with_the_label_projection(arch):
    trainer = GANTrainer(tiny_cfg(arch, "model.dp_compatible=true", "train.d_trainable_last=1",
                                  "model.condition=['view', 'sex']"))
    trained = {n for n, p in trainer.D.named_parameters() if p.requires_grad}
    output = {n for n in trained if n.rsplit(".", 1)[0] == OUTPUT_LAYER[arch]}
    label = {n for n in trained if n.startswith(LABEL_PROJECTION[arch])}
    assert output and label and trained == output | label


def test_trainable_depth_counts_back_from_the_output_along_the_image_path():
    trainer = GANTrainer(tiny_cfg("stylegan2", "model.dp_compatible=true", "train.d_trainable_last=3"))
    assert {n for n, p in trainer.D.named_parameters() if p.requires_grad} == {
        "conv.weight", "conv.bias", "fc.weight", "fc.bias", "out.weight", "out.bias"}


@pytest.mark.parametrize("arch, setting", [("progan", "train.loss=wgan-gp"), ("stylegan2", "train.r1_gamma=1")])
def test_compile_is_refused_for_a_loss_that_differentiates_gradients(arch, setting):
    from medsyngan.errors import UserError

    with pytest.raises(UserError, match="train.compile cannot train with .*does not differentiate gradients twice"):
        tiny_cfg(arch, setting, "train.compile=true")
    tiny_cfg("dcgan", "train.compile=true")  # the non-saturating loss alone compiles
