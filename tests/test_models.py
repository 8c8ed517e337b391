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
    "stylegan2": dict(fmap_base=16, fmap_max=8, z_dim=8, w_dim=8),
}


def _slow_above(limit: int, resolutions: tuple[int, ...]) -> list:
    """Resolutions above ``limit`` take seconds each even at width 1 (megapixel convolutions)."""
    return [pytest.param(r, marks=pytest.mark.slow) if r > limit else r for r in resolutions]


def _cfg(arch: str, resolution: int, **extra) -> ModelSection:
    return ModelSection(arch=arch, resolution=resolution, **{**TINY[arch], **extra})


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- registry -------------------------------------------------------------------------------------------------


def test_unknown_arch_names_the_supported_ones():
    with pytest.raises(UserError, match="dcgan"):
        build_generator(ModelSection.model_construct(arch="biggan", resolution=64))


_POW2_8_1024 = "8, 16, 32, 64, 128, 256, 512, 1024"


@pytest.mark.parametrize(
    "arch,listed", [("dcgan", "32, 64, 128, 256"), ("progan", _POW2_8_1024), ("stylegan2", _POW2_8_1024)]
)
def test_unsupported_resolution_names_the_supported_ones(arch, listed):
    for build in (build_generator, build_discriminator):
        with pytest.raises(UserError, match=f"resolution 2048 is not supported by {arch}; use one of: {listed}$"):
            build(ModelSection(arch=arch, resolution=2048))


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


@pytest.mark.parametrize("resolution", _slow_above(256, SUPPORTED_RESOLUTIONS["progan"]))
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


# --- StyleGAN2 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", _slow_above(256, SUPPORTED_RESOLUTIONS["stylegan2"]))
def test_stylegan2_shapes(resolution):
    cfg = _cfg("stylegan2", resolution)
    g, d = build_generator(cfg), build_discriminator(cfg)
    log2 = resolution.bit_length() - 1
    assert (g.z_dim, g.w_dim, g.resolution, g.num_ws) == (8, 8, resolution, 2 * log2 - 2)
    z = torch.randn(2, 8)
    ws = g.mapping(z)
    assert ws.shape == (2, g.num_ws, 8)
    img = g.synthesis(ws)
    assert img.shape == (2, 1, resolution, resolution)
    assert d(img).shape == (2,)
    assert g(z).shape == (2, 1, resolution, resolution)


def _stylegan2(resolution=16, **extra):
    from medsyngan.models.stylegan2 import StyleGAN2Generator

    torch.manual_seed(0)
    return StyleGAN2Generator(resolution, z_dim=8, w_dim=6, mapping_layers=3, fmap_base=64, fmap_max=8, **extra)


def test_stylegan2_w_avg_tracking_and_truncation():
    g = _stylegan2().train()
    m = g.mapping
    z = torch.randn(5, 8)
    # Independent forward of the mapping network: normalise z, three equalized FC layers with lr multiplier 0.01.
    x = z / z.square().mean(1, keepdim=True).sqrt()
    for layer in m.layers:
        x = F.leaky_relu(F.linear(x, layer.weight * 0.01 / layer.weight.shape[1] ** 0.5, layer.bias * 0.01), 0.2)
        x = x * 2**0.5
    ws = m(z)
    torch.testing.assert_close(ws, x[:, None].expand(-1, g.num_ws, -1))
    torch.testing.assert_close(m.w_avg, (1 - 0.995) * x.mean(0))
    with torch.no_grad():
        m.w_avg.copy_(torch.randn(6))
    g.eval()
    w_avg = m.w_avg.clone()
    ws0 = m(torch.randn(4, 8), truncation_psi=0.0)
    torch.testing.assert_close(ws0, w_avg.expand(4, g.num_ws, -1))
    torch.testing.assert_close(m.w_avg, w_avg)  # eval mode leaves it alone
    z = torch.randn(4, 8)
    full, half = m(z), m(z, truncation_psi=0.5, truncation_cutoff=2)
    torch.testing.assert_close(half[:, :2], w_avg + 0.5 * (full[:, :2] - w_avg))
    torch.testing.assert_close(half[:, 2:], full[:, 2:])


def test_stylegan2_noise_modes_and_forward():
    g = _stylegan2().eval()
    for layer in g.modules():
        if hasattr(layer, "noise_strength"):
            layer.noise_strength.data.fill_(0.5)
    z = torch.randn(2, 8)
    with torch.no_grad():
        ws = g.mapping(z)
        const = g.synthesis(ws, noise_mode="const")
        torch.testing.assert_close(g.synthesis(ws, noise_mode="const"), const)
        torch.testing.assert_close(g(z, noise_mode="const"), const)
        assert not torch.allclose(g.synthesis(ws, noise_mode="random"), const)
        assert not torch.allclose(g.synthesis(ws, noise_mode="none"), const)
        # Style mixing as the trainer does it: the image depends on the ws of both latents.
        ws2 = g.mapping(torch.randn(2, 8))
        mixed = g.synthesis(torch.cat([ws[:, :3], ws2[:, 3:]], 1), noise_mode="const")
        assert not torch.allclose(mixed, const) and not torch.allclose(mixed, g.synthesis(ws2, noise_mode="const"))
    with pytest.raises(ValueError, match="noise_mode"):
        g.synthesis(ws, noise_mode="fixed")


def test_stylegan2_fused_and_unfused_modconv_agree():
    z = torch.randn(3, 8)
    outs = []
    for fused in (True, False):
        g = _stylegan2(fused_modconv=fused).eval()
        with torch.no_grad():
            outs.append(g(z, noise_mode="const"))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_modulated_conv_matches_per_sample_convolution():
    from medsyngan.models.layers import modulated_conv2d

    torch.manual_seed(0)
    x, weight, styles = torch.randn(3, 5, 8, 8), torch.randn(4, 5, 3, 3), torch.randn(3, 5)
    for fused in (True, False):
        y = modulated_conv2d(x, weight, styles, fused=fused)
        for i in range(3):
            w_i = weight * styles[i][None, :, None, None]
            w_i = w_i / w_i.square().sum(dim=(1, 2, 3), keepdim=True).sqrt()
            torch.testing.assert_close(y[i : i + 1], F.conv2d(x[i : i + 1], w_i, padding=1), rtol=1e-4, atol=1e-5)


def test_demodulation_normalizes_output_std():
    from medsyngan.models.layers import modulated_conv2d

    torch.manual_seed(0)
    x = torch.randn(4, 64, 32, 32)
    weight = torch.randn(32, 64, 3, 3)
    styles = torch.rand(4, 64) * 10  # far from unit scale, so without demodulation the std is far from 1
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # away from the zero padding
    std = modulated_conv2d(x, weight, styles)[inner].std(dim=(2, 3))
    # Each channel's std estimate from ~900 correlated pixels is good to a few percent; the mean is tighter.
    assert ((std - 1).abs() < 0.1).all() and abs(std.mean() - 1) < 0.02, std
    assert modulated_conv2d(x, weight, styles, demodulate=False)[inner].std() > 10


def test_upsampling_modulated_conv_keeps_the_mean_gain():
    """On a constant image, up=True must give (away from borders) what the same convolution gives at the input
    resolution: the transposed convolution's checkerboard is removed by the FIR filter and gain 4 restores the mean."""
    from medsyngan.models.layers import fir_filter, modulated_conv2d

    torch.manual_seed(0)
    x = torch.randn(2, 3, 1, 1).expand(-1, -1, 8, 8)
    weight, styles = torch.randn(4, 3, 3, 3), torch.randn(2, 3)
    same = modulated_conv2d(x, weight, styles)
    for fused in (True, False):
        up = modulated_conv2d(x, weight, styles, up=True, resample_filter=fir_filter(), fused=fused)
        assert up.shape == (2, 4, 16, 16)
        torch.testing.assert_close(up[..., 3:-3, 3:-3], same[..., 1:2, 1:2].expand(-1, -1, 10, 10))


def test_fir_resampling_keeps_constant_images_constant():
    from medsyngan.models.layers import fir_downsample, fir_filter, fir_upsample

    ones = torch.ones(1, 2, 8, 8)
    up, down = fir_upsample(ones, fir_filter()), fir_downsample(ones, fir_filter())
    assert up.shape == (1, 2, 16, 16) and down.shape == (1, 2, 4, 4)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.ones(1, 2, 12, 12))
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.ones(1, 2, 2, 2))


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


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_progan_stage_parameters_are_exactly_those_with_gradients():
    """At every stage, freezing all but ``stage_parameters()`` leaves Opacus a per-sample gradient for every
    trainable parameter (what its DPOptimizer requires), with the network wrapped once at full size."""
    from opacus import GradSampleModule

    g, d = _progan_pair(dp_compatible=True)
    gsm = GradSampleModule(d, loss_reduction="sum")
    for stage, alpha in [(4, 1.0), (8, 0.5), (16, 1.0), (32, 0.2)]:
        g.set_stage(stage, alpha)
        d.set_stage(stage, alpha)
        for net in (g, d):
            net.zero_grad(set_to_none=True)
            for p in net.parameters():
                p.requires_grad_(False)
            for p in net.stage_parameters():
                p.requires_grad_(True)
        gsm(g(torch.randn(3, 8))).sum().backward()
        for net in (g, d):
            for name, p in net.named_parameters():
                assert (p.grad is not None) == p.requires_grad, (stage, name)
        for name, p in d.named_parameters():
            assert (p.grad_sample is not None) == p.requires_grad, (stage, name)
            p.grad_sample = None
    gsm._close()
