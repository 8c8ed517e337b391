"""Architectures: shapes at every supported resolution, textbook equivalence, ProGAN fade-in, StyleGAN2 internals,
and the DP-compatible discriminators under Opacus."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medsyngan.config import ModelSection
from medsyngan.errors import UserError
from medsyngan.models.registry import SUPPORTED_RESOLUTIONS, build_discriminator, build_generator

# Tiny widths keep every shape test fast; the architecture (depth, resampling) is the same as at full width.
TINY = {
    "dcgan": dict(ngf=4, ndf=4, z_dim=8),
    "progan": dict(fmap_base=16, fmap_max=8, z_dim=8),
}


def _cfg(arch: str, resolution: int, **extra) -> ModelSection:
    return ModelSection(arch=arch, resolution=resolution, **{**TINY[arch], **extra})


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- registry -------------------------------------------------------------------------------------------------


def test_unknown_arch_names_the_supported_ones():
    with pytest.raises(UserError, match="dcgan"):
        build_generator(ModelSection.model_construct(arch="biggan", resolution=64))


def test_unsupported_resolution_names_the_supported_ones():
    with pytest.raises(UserError, match="32, 64, 128, 256"):
        build_discriminator(ModelSection(arch="dcgan", resolution=512))


# --- DCGAN ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", SUPPORTED_RESOLUTIONS["dcgan"])
@pytest.mark.parametrize("dp", [False, True])
def test_dcgan_shapes(resolution, dp):
    cfg = _cfg("dcgan", resolution, dp_compatible=dp)
    g, d = build_generator(cfg), build_discriminator(cfg)
    assert (g.z_dim, g.resolution) == (8, resolution)
    img = g(torch.randn(3, 8))
    assert img.shape == (3, 1, resolution, resolution)
    assert img.abs().max() <= 1
    assert d(img).shape == (3,)


def _textbook_dcgan(nz=100, ngf=64, ndf=64, nc=1):
    """pytorch/examples/dcgan/main.py, copied layer for layer (Sigmoid dropped: it has no parameters)."""
    g = nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
        nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh(),
    )
    d = nn.Sequential(
        nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),
    )
    return g, d


def test_textbook_dcgan_parameter_count():
    cfg = ModelSection(arch="dcgan", resolution=64, z_dim=100, ngf=64, ndf=64)
    g, d = build_generator(cfg), build_discriminator(cfg)
    # By hand: transposed-conv weights (no biases) plus BatchNorm scale and shift.
    g_hand = 100 * 512 * 16 + 512 * 256 * 16 + 256 * 128 * 16 + 128 * 64 * 16 + 64 * 1 * 16 + 2 * (512 + 256 + 128 + 64)
    d_hand = 1 * 64 * 16 + 64 * 128 * 16 + 128 * 256 * 16 + 256 * 512 * 16 + 512 * 1 * 16 + 2 * (128 + 256 + 512)
    assert (_n_params(g), _n_params(d)) == (g_hand, d_hand) == (3_574_656, 2_763_520)
    d_dp = build_discriminator(cfg.model_copy(update={"dp_compatible": True}))
    assert _n_params(d_dp) == d_hand


def test_textbook_dcgan_is_the_same_network():
    """The textbook weights load into ours key for key and give the same outputs."""
    cfg = ModelSection(arch="dcgan", resolution=64, z_dim=100, ngf=64, ndf=64)
    g, d = build_generator(cfg).eval(), build_discriminator(cfg).eval()
    tg, td = _textbook_dcgan()
    g.main.load_state_dict(tg.state_dict())
    d.main.load_state_dict(td.state_dict())
    z = torch.randn(2, 100)
    with torch.no_grad():
        img = g(z)
        torch.testing.assert_close(img, tg.eval()(z.view(2, 100, 1, 1)))
        torch.testing.assert_close(d(img), td.eval()(img).view(-1))


def test_dcgan_init_follows_the_paper():
    g = build_generator(ModelSection(arch="dcgan", resolution=64))
    convs = [m.weight for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    norms = [m.weight for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    w = torch.cat([c.flatten() for c in convs])
    s = torch.cat([n.flatten() for n in norms])
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    assert abs(s.mean().item() - 1) < 5e-3 and abs(s.std().item() - 0.02) < 5e-3


# --- ProGAN ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", SUPPORTED_RESOLUTIONS["progan"])
def test_progan_shapes_at_every_stage(resolution):
    cfg = _cfg("progan", resolution)
    g, d = build_generator(cfg), build_discriminator(cfg)
    assert (g.z_dim, g.resolution, g.stage_resolution, g.alpha) == (8, resolution, resolution, 1.0)
    z = torch.randn(2, 8)
    with torch.no_grad():
        assert d(g(z)).shape == (2,)
        assert g(z).shape == (2, 1, resolution, resolution)
        for stage in (4, 8, resolution // 2):
            g.set_stage(stage, 0.5)
            d.set_stage(stage, 0.5)
            img = g(z)
            assert img.shape == (2, 1, stage, stage)
            assert d(img).shape == (2,)


def _progan_pair(resolution=32, **extra):
    torch.manual_seed(0)
    cfg = ModelSection(arch="progan", resolution=resolution, fmap_base=128, fmap_max=16, z_dim=8, **extra)
    return build_generator(cfg), build_discriminator(cfg)


def test_progan_generator_fade_in():
    g, _ = _progan_pair()
    z = torch.randn(3, 8)
    with torch.no_grad():
        g.set_stage(8, 1.0)
        low = F.interpolate(g(z), scale_factor=2, mode="nearest")
        g.set_stage(16, 0.0)
        torch.testing.assert_close(g(z), low)
        # alpha = 1 is the new block alone, computed here from the sub-modules.
        x = g.blocks["16"](g.blocks["8"](g.blocks["4"](z)))
        new = g.to_rgb["16"](x)
        g.set_stage(16, 1.0)
        torch.testing.assert_close(g(z), new)
        g.set_stage(16, 0.3)
        torch.testing.assert_close(g(z), 0.7 * low + 0.3 * new)
        assert not torch.allclose(low, new, atol=1e-3)


def test_progan_discriminator_fade_in():
    _, d = _progan_pair()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        d.set_stage(8, 1.0)
        low = d(F.avg_pool2d(x, 2))
        d.set_stage(16, 0.0)
        torch.testing.assert_close(d(x), low)
        d.set_stage(16, 1.0)
        h = F.leaky_relu(d.from_rgb["16"](x), 0.2)
        new = d.output(d.blocks["8"](d.blocks["16"](h)))
        torch.testing.assert_close(d(x), new)
        with pytest.raises(ValueError, match="stage 16"):
            d(torch.randn(4, 1, 32, 32))


def test_progan_state_dict_carries_stage_and_alpha():
    g, d = _progan_pair()
    g.set_stage(16, 0.25)
    g2, _ = _progan_pair()
    g2.load_state_dict(g.state_dict())
    assert (g2.stage_resolution, g2.alpha) == (16, 0.25)
    with pytest.raises(ValueError, match="stage resolution"):
        d.set_stage(64, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        d.set_stage(8, 1.5)


# --- DP-compatible discriminators -----------------------------------------------------------------------------

DP_CASES = [(arch, min(SUPPORTED_RESOLUTIONS[arch], key=lambda r: abs(r - 32))) for arch in TINY]


@pytest.mark.parametrize("arch,resolution", DP_CASES)
def test_dp_discriminator_passes_opacus_validator(arch, resolution):
    from opacus.validators import ModuleValidator

    d = build_discriminator(_cfg(arch, resolution, dp_compatible=True))
    assert ModuleValidator.validate(d, strict=False) == []


@pytest.mark.parametrize("arch,resolution", DP_CASES)
def test_only_the_dp_discriminator_keeps_samples_independent(arch, resolution):
    """BatchNorm (DCGAN) or minibatch-stddev makes one sample's logit depend on the rest of the batch; the DP
    form must not."""
    torch.manual_seed(0)
    d = build_discriminator(_cfg(arch, resolution)).train()
    x = torch.randn(4, 1, resolution, resolution)
    y = x.clone()
    y[1:] = torch.randn(3, 1, resolution, resolution)
    assert not torch.allclose(d(x)[0], d(y)[0])
    d_dp = build_discriminator(_cfg(arch, resolution, dp_compatible=True)).train()
    torch.testing.assert_close(d_dp(x)[0], d_dp(y)[0])


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("arch,resolution", DP_CASES)
def test_dp_discriminator_per_sample_gradients_match_a_loop(arch, resolution):
    from opacus import GradSampleModule

    torch.manual_seed(0)
    d = build_discriminator(_cfg(arch, resolution, dp_compatible=True))
    if hasattr(d, "set_stage"):  # mid fade-in, so that both ProGAN paths carry gradient
        resolution //= 2
        d.set_stage(resolution, 0.5)
    x = torch.randn(3, 1, resolution, resolution)
    expected = []
    for i in range(3):
        d.zero_grad(set_to_none=True)
        d(x[i : i + 1]).sum().backward()
        expected.append({n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None})
    d.zero_grad(set_to_none=True)
    gsm = GradSampleModule(d, loss_reduction="sum")
    gsm(x).sum().backward()
    assert len(expected[0]) >= 8
    for name, p in d.named_parameters():
        if name not in expected[0]:  # a resolution the current stage does not use
            assert p.grad_sample is None, name
            continue
        assert p.grad_sample is not None, name
        for i in range(3):
            torch.testing.assert_close(p.grad_sample[i], expected[i][name], rtol=1e-4, atol=1e-6, msg=name)
    gsm._close()
