"""StyleGAN3: shapes, parameter counts measured on NVlabs' networks_stylegan3, the layer schedule, the resampling
filters and resamplers against direct formulas, magnitude normalisation, sub-pixel translation equivariance (which
StyleGAN2 lacks), training with and without DP-SGD, generation and checkpoints, and the presets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsyngan.config import ModelSection, load_config
from medsyngan.errors import UserError
from medsyngan.models.layers import fir_decimate, fir_interpolate
from medsyngan.models.registry import build_discriminator, build_generator
from medsyngan.models.stylegan2 import StyleGAN2Discriminator, StyleGAN2Generator
from medsyngan.models.stylegan3 import StyleGAN3Generator, layer_schedule, lowpass_filter
from medsyngan.training.step import GANTrainer

TINY = dict(fmap_base=64, fmap_max=8, z_dim=8, w_dim=8)
TRAIN = ["run.device=cpu", "model.arch=stylegan3", "model.resolution=64", "data.size=64", "model.fmap_base=64",
         "model.fmap_max=8", "model.z_dim=8", "model.w_dim=8", "train.batch_size=4", "train.amp=off"]


def _cfg(resolution: int = 64, **extra) -> ModelSection:
    return ModelSection(arch="stylegan3", resolution=resolution, **{**TINY, **extra})


def _batches(size: int = 64, batch: int = 4):
    gen = torch.Generator().manual_seed(0)
    return lambda: torch.rand(batch, 1, size, size, generator=gen) * 2 - 1


# --- architecture -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["t", "r"])
@pytest.mark.parametrize("resolution", [64, 128])
def test_shapes(config, resolution):
    torch.manual_seed(0)
    cfg = _cfg(resolution, sg3_config=config)
    g, d = build_generator(cfg), build_discriminator(cfg)
    assert isinstance(d, StyleGAN2Discriminator)
    assert (g.z_dim, g.w_dim, g.resolution, g.num_ws) == (8, 8, resolution, 16)
    z = torch.randn(2, 8)
    ws = g.mapping(z)
    assert ws.shape == (2, 16, 8)
    img = g.synthesis(ws)
    assert img.shape == (2, 1, resolution, resolution) and torch.isfinite(img).all()
    assert d(img).shape == (2,)
    assert g(z).shape == (2, 1, resolution, resolution)
    *layers, torgb = g.synthesis.layers
    assert {layer.weight.shape[-1] for layer in layers} == {3 if config == "t" else 1}
    assert torgb.weight.shape[-1] == 1 and torgb.weight.shape[0] == 1
    # Config R: 2-D jinc down filters except in the critically sampled layers; separable ones otherwise.
    critical = [i >= len(layers) - 2 for i in range(len(layers))]
    assert [layer.down_filter.ndim for layer in layers] == [1 if config == "t" or c else 2 for c in critical]
    assert all(layer.up_filter.ndim == 1 for layer in layers)


def test_unsupported_resolution_names_the_supported_ones():
    with pytest.raises(UserError, match="resolution 32 is not supported by stylegan3; use one of: 64, 128, 256, "
                                        "512, 1024$"):
        build_generator(ModelSection(arch="stylegan3", resolution=32))


# Measured: sum of parameter sizes of NVlabs' networks_stylegan3.Generator(z_dim, 0, w_dim, resolution, 1,
# channel_base, channel_max [, conv_kernel=1, use_radial_filters=True for R, with base and max doubled as in their
# train.py]), github.com/NVlabs/stylegan3 at c233a91; the command is in the stylegan3 module docstring.
NVLABS_PARAMS = [
    ("t", 64, 2048, 128, 512, 2_615_799),
    ("r", 64, 2048, 128, 512, 2_652_732),
    ("t", 128, 4096, 256, 256, 5_226_384),
    ("r", 128, 4096, 256, 256, 3_604_156),
    ("t", 256, 8192, 256, 256, 5_833_791),
    ("r", 256, 8192, 256, 256, 3_950_841),
    ("t", 64, 32768, 512, 512, 37_767_173),
    ("r", 64, 32768, 512, 512, 24_151_045),
    ("t", 256, 32768, 512, 512, 28_471_875),
    ("r", 256, 32768, 512, 512, 18_815_873),
    ("t", 1024, 32768, 512, 512, 22_313_101),
    ("r", 1024, 32768, 512, 512, 15_093_021),
]


@pytest.mark.parametrize("config,resolution,fmap_base,fmap_max,dim,expected", NVLABS_PARAMS)
def test_parameter_counts_equal_nvlabs(config, resolution, fmap_base, fmap_max, dim, expected):
    with torch.device("meta"):
        g = StyleGAN3Generator(resolution, dim, dim, 2, fmap_base, fmap_max, config=config)
    assert sum(p.numel() for p in g.parameters()) == expected


def test_layer_schedule_at_64_px():
    # NVlabs' SynthesisNetwork at 64 px (printed by their extra_repr): rates, sizes and the band edges.
    s = layer_schedule(64, 14, 32768, 512, 1)
    assert s["rate"] == [16] * 4 + [32] * 4 + [64] * 7
    assert s["size"] == [36] * 4 + [52] * 4 + [84] * 5 + [64] * 2
    assert s["channels"] == [512] * 14 + [1]
    np.testing.assert_allclose(s["cutoff"][:4], [2, 2 * 2 ** (1 / 3), 2 * 2 ** (2 / 3), 4])
    np.testing.assert_allclose(s["cutoff"][-3:], [32] * 3)
    np.testing.assert_allclose(s["half_width"][:3], [6, 5.48016, 4.82520], atol=1e-5)
    np.testing.assert_allclose(s["half_width"][-1], 32 * 2**0.3 - 32)  # critical: stopband above the cutoff
    narrow = layer_schedule(64, 14, 4096, 256, 1)["channels"]
    assert narrow[:7] == [256] * 7 and narrow[-3:-1] == [64, 64]  # fmap_base / (2 cutoff), capped


def _response(f: torch.Tensor, freq: float, fs: float) -> float:
    """|H(freq)| of a 1-D symmetric filter sampled at fs."""
    n = torch.arange(f.numel(), dtype=torch.float64) - (f.numel() - 1) / 2
    return float((f.double() * torch.cos(2 * math.pi * freq / fs * n)).sum().abs())


def test_lowpass_filters_pass_the_band_and_stop_above_it():
    f = lowpass_filter(12, cutoff=8, width=12, fs=32)
    assert f.shape == (12,)
    torch.testing.assert_close(f, f.flip(0))
    assert _response(f, 0, 32) == pytest.approx(1.0, abs=1e-6)
    assert _response(f, 8, 32) == pytest.approx(0.5, abs=0.05)  # the cutoff is the -6 dB point
    assert max(_response(f, fr, 32) for fr in np.linspace(14, 16, 9)) < 0.05  # beyond cutoff + half width
    radial = lowpass_filter(12, cutoff=8, width=12, fs=32, radial=True)
    torch.testing.assert_close(radial, radial.T)
    torch.testing.assert_close(radial, radial.flip(0))
    assert torch.isclose(radial.sum(), torch.tensor(1.0))


def _upfirdn_direct(x, f, up, down, padding, gain=1.0):
    """Zero insertion, padding (negative: crop), full-rate filtering, then dropping samples: the definition."""
    b, c, h, w = x.shape
    z = torch.zeros(b, c, h * up, w * up, dtype=x.dtype)
    z[:, :, ::up, ::up] = x
    z = F.pad(z, padding)
    y = F.conv2d(z.reshape(b * c, 1, *z.shape[2:]), (f * gain * up * up)[None, None])
    return y.reshape(b, c, *y.shape[2:])[:, :, ::down, ::down]


@pytest.mark.parametrize("two_pass", [False, True])
@pytest.mark.parametrize("up,padding", [(2, (9, 8, 9, 8)), (2, (-3, 5, 14, 13)), (4, (20, 19, 20, 19)),
                                        (4, (0, -2, 3, 3))])
def test_fir_interpolate_and_decimate_equal_their_definition(up, padding, two_pass):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 11, dtype=torch.float64)
    f = torch.rand(6 * up, dtype=torch.float64)
    f = f + f.flip(0)
    expected = _upfirdn_direct(x, torch.outer(f, f), up, 1, padding, 1.5)
    torch.testing.assert_close(fir_interpolate(x, f, up, padding, gain=1.5, two_pass=two_pass), expected)
    y = torch.randn(2, 3, 29, 30, dtype=torch.float64)
    d = f[:12] + f[:12].flip(0)
    torch.testing.assert_close(fir_decimate(y, d, 2, two_pass), _upfirdn_direct(y, torch.outer(d, d), 1, 2, (0,) * 4))
    g = torch.rand(12, 12, dtype=torch.float64)
    g = g + g.flip(0) + g.flip(1) + g.flip(0).flip(1)  # a 2-D filter ignores two_pass
    torch.testing.assert_close(fir_decimate(y, g, 2, two_pass), _upfirdn_direct(y, g, 1, 2, (0, 0, 0, 0)))


def test_magnitude_ema_tracks_the_input_in_training_only():
    torch.manual_seed(0)
    g = StyleGAN3Generator(64, 8, 8, fmap_base=64, fmap_max=8, magnitude_ema_beta=0.9)
    layer = g.synthesis.layers[3]
    x = torch.randn(2, layer.weight.shape[1], 36, 36) * 3
    w = torch.randn(2, 8)
    with torch.no_grad():
        layer.eval()
        layer(x, w)
        assert layer.magnitude_ema == 1
        layer.train()
        layer(x, w)
        torch.testing.assert_close(layer.magnitude_ema, 0.9 + 0.1 * x.square().mean())
        # The layer divides its input by the running RMS.
        layer.eval()
        out = layer(x, w)
        rms = layer.magnitude_ema.sqrt()
        layer.magnitude_ema.fill_(1.0)
        torch.testing.assert_close(out, layer(x / rms, w))


def test_truncation_to_the_mean_gives_one_image():
    torch.manual_seed(0)
    g = StyleGAN3Generator(64, 8, 8, fmap_base=64, fmap_max=8).eval()
    with torch.no_grad():
        g.mapping.w_avg.normal_()
        images = g(torch.randn(3, 8), truncation_psi=0.0)
        torch.testing.assert_close(images, images[:1].expand(3, -1, -1, -1))
        free = g(torch.randn(2, 8))
        assert not torch.allclose(free[0], free[1])


def test_fused_and_unfused_modulated_convolutions_agree():
    z = torch.randn(3, 8)
    outs = []
    for fused in (True, False):
        torch.manual_seed(0)
        g = StyleGAN3Generator(64, 8, 8, fmap_base=64, fmap_max=8, config="t", fused_modconv=fused).eval()
        with torch.no_grad():
            outs.append(g(z))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-6)


# --- alias-free: equivariance to sub-pixel translation -----------------------------------------------------------


def _lanczos_shift(img: torch.Tensor, dx: float, dy: float, a: int = 3) -> torch.Tensor:
    """The image's content moved right by dx and down by dy pixels, interpolated with a Lanczos-a kernel."""

    def taps(d: float) -> torch.Tensor:
        u = torch.arange(-a, a + 1, dtype=torch.float64) + d  # out[i] = sum_m x[i + m] h(m + d)
        h = torch.sinc(u) * torch.sinc(u / a) * (u.abs() < a)
        return (h / h.sum()).to(img.dtype)

    img = F.conv2d(F.pad(img, (a, a, 0, 0)), taps(dx).view(1, 1, 1, -1))
    return F.conv2d(F.pad(img, (0, 0, a, a)), taps(dy).view(1, 1, -1, 1))


def _psnr(a: torch.Tensor, b: torch.Tensor, border: int = 8) -> float:
    """PSNR (dB) of a against b away from the borders, peak = b's range there (untrained images are faint)."""
    a, b = a[..., border:-border, border:-border], b[..., border:-border, border:-border]
    return float(20 * torch.log10(b.amax() - b.amin()) - 10 * torch.log10((a - b).square().mean()))


SHIFT = (0.37, 0.19)  # pixels: a sub-pixel move of the output image


def _stylegan3_eq(config: str) -> tuple[float, float]:
    torch.manual_seed(0)
    g = StyleGAN3Generator(64, 32, 32, fmap_base=512, fmap_max=64, config=config).eval()
    with torch.no_grad():
        ws = g.mapping(torch.randn(4, 32))
        still = g.synthesis(ws)
        # The transform is the inverse of the move, in image widths: -t translates the image by +t.
        g.synthesis.input.transform[:2, 2] = -torch.tensor(SHIFT) / 64
        moved = g.synthesis(ws)
    return _psnr(moved, _lanczos_shift(still, *SHIFT)), _psnr(moved, still)


def _stylegan2_eq() -> float:
    """StyleGAN2's input is its learned 4x4 constant: move it by the same fraction of the image (band-limited,
    by the Fourier shift theorem) and compare the output with the moved image in the same way."""
    torch.manual_seed(0)
    g = StyleGAN2Generator(64, 32, 32, fmap_base=512, fmap_max=64).eval()
    const = g.synthesis.blocks[0].const
    fy, fx = torch.fft.fftfreq(4)[:, None], torch.fft.fftfreq(4)[None, :]
    ramp = torch.exp(-2j * math.pi * (fx * SHIFT[0] + fy * SHIFT[1]) * 4 / 64)
    with torch.no_grad():
        ws = g.mapping(torch.randn(4, 32))
        still = g.synthesis(ws, noise_mode="none")
        const.copy_(torch.fft.ifft2(torch.fft.fft2(const) * ramp).real)
        moved = g.synthesis(ws, noise_mode="none")
    return _psnr(moved, _lanczos_shift(still, *SHIFT))


# Measured (seed 0, four images at 64 px): StyleGAN3-T 69.7 dB, StyleGAN3-R 68.8 dB against the moved image (and
# 46 dB against the unmoved one: the image did move); StyleGAN2 42.3 dB. The threshold lies between.
EQ_T_THRESHOLD_DB = 56.0


@pytest.mark.parametrize("config", ["t", "r"])
def test_output_follows_a_subpixel_translation_of_the_input(config):
    equivariance, unmoved = _stylegan3_eq(config)
    assert equivariance > EQ_T_THRESHOLD_DB > unmoved + 5


def test_stylegan2_does_not_meet_the_equivariance_threshold():
    assert _stylegan2_eq() < EQ_T_THRESHOLD_DB


# --- training, DP, generation, checkpoints, presets -------------------------------------------------------------


def test_trainer_steps_with_style_mixing_and_r1():
    cfg = load_config(None, [*TRAIN, "train.style_mixing_p=1", "train.r1_interval=2", "train.pl_weight=0",
                             "train.ema_kimg=0.01", "model.sg3_magnitude_ema_beta=0.5"])
    trainer = GANTrainer(cfg)
    assert trainer.style_based and trainer.use_r1 and not trainer.use_pl and trainer.mixing_p == 1
    before = {k: v.clone() for k, v in trainer.model_state(("G", "D")).items()}
    mixed = []
    mapping = trainer.G.mapping.forward
    trainer.G.mapping.forward = lambda z, *a, **k: mixed.append(k.get("update_w_avg")) or mapping(z, *a, **k)
    stats = [trainer.train_step(_batches()) for _ in range(2)]
    assert mixed == [None, False] * 2  # the second latent of every mixed batch leaves w_avg alone
    assert all(math.isfinite(v) for s in stats for v in s.values()) and "r1" in stats[1]
    after = trainer.model_state(("G", "D"))
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"G.synthesis.layers.0.weight", "G.synthesis.input.weight", "G.mapping.w_avg", "D.out.weight"} <= moved
    assert all(f"G.synthesis.layers.{i}.magnitude_ema" in moved for i in range(15))
    assert torch.equal(trainer.G_ema.synthesis.layers[5].magnitude_ema, trainer.G.synthesis.layers[5].magnitude_ema)


def test_dp_step_with_the_dp_compatible_discriminator():
    from tiny_dp import enable_dp_from

    cfg = load_config(None, [*TRAIN, "model.dp_compatible=true", "privacy.dp=true", "train.r1_gamma=0",
                             "privacy.target_epsilon=3"])
    trainer = GANTrainer(cfg, device="cpu")
    assert trainer.D.mbstd is None
    images = np.random.default_rng(0).integers(0, 256, (40, 64, 64), dtype=np.uint8)
    session = enable_dp_from(cfg, trainer, images, None, planned_steps=10, seed=5)
    stats = trainer.train_step(session.next_real)
    assert session.steps == 1 and all(math.isfinite(v) for v in stats.values())


def test_generation_and_checkpoint_round_trip(tmp_path):
    from medsyngan.training.checkpoint import save_trainer_checkpoint
    from medsyngan.training.generate import generate_images, load_generator

    cfg = load_config(None, [*TRAIN, "model.sg3_config=r", "train.ema_kimg=0.01"])
    trainer = GANTrainer(cfg)
    trainer.train_step(_batches())
    with torch.no_grad():  # a user transform travels with the weights
        trainer.G_ema.synthesis.input.transform[0, 2] = 0.01
    save_trainer_checkpoint(tmp_path, trainer, cfg)
    G, meta = load_generator(tmp_path)
    assert meta["generator_part"] == "G_ema" and G.config == "r"
    assert torch.equal(G.synthesis.input.transform, trainer.G_ema.synthesis.input.transform)
    images = generate_images(G, 5, seed=3, batch_size=2)
    assert images.shape == (5, 64, 64) and images.dtype == np.uint8
    assert np.array_equal(images, generate_images(trainer.G_ema, 5, seed=3, batch_size=5))
    assert not np.array_equal(images, generate_images(G, 5, seed=3, truncation_psi=0.5))


@pytest.mark.parametrize("preset", ["stylegan3-64", "stylegan3-256"])
def test_presets_follow_nvlabs_stylegan3_settings(preset):
    cfg = load_config(preset)
    assert cfg.model.arch == "stylegan3" and cfg.model.sg3_config == "t" and cfg.model.sg3_layers == 14
    # NVlabs' recommended gamma: 0.5 at 128 px, growing with the square of the resolution (docs/configs.md).
    assert cfg.train.r1_gamma == 0.5 * (cfg.model.resolution / 128) ** 2
    assert (cfg.train.pl_weight, cfg.train.style_mixing_p, cfg.train.lr_g, cfg.train.lr_d) == (0, 0, 0.0025, 0.002)
    assert cfg.model.sg3_magnitude_ema_beta == pytest.approx(0.5 ** (cfg.train.batch_size / 20000), abs=1e-4)
    with torch.device("meta"):
        assert build_generator(cfg.model).num_ws == 16
