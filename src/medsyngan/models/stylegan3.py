"""StyleGAN3 (Karras et al. 2021, "Alias-Free Generative Adversarial Networks"), configs T and R, greyscale.

The generator of NVlabs' networks_stylegan3, rebuilt on this package's layers (their code is not copied):

- Mapping network: StyleGAN2's (z normalisation, equalized fully connected layers with learning-rate multiplier
  0.01, ``w_avg`` tracked in training mode with decay 0.998, truncation), broadcast to ``num_ws`` = layers + 2.
  ``mapping(z, update_w_avg=...)``, ``synthesis(ws)`` and ``forward(z, truncation_psi, truncation_cutoff)`` behave
  as StyleGAN2Generator's, so the trainer's style mixing and the metrics use both generations alike; there are no
  noise inputs.
- Input: Fourier features of frequencies uniform in a disc of radius 2 (the first cutoff), rotated and translated
  by an affine of the first w (initialised to the identity) and by the user's ``synthesis.input.transform``.
- Layers (Appendix F, :func:`layer_schedule`): cutoffs grow geometrically from 2 to R/2, minimum stopbands from
  2^2.1 to R/2 · 2^0.3, over ``num_layers`` - 2 layers, then two critically sampled layers (rate R, cutoff R/2);
  rates are the powers of two at least twice the stopband; maps carry 10 margin pixels per side, cropped before
  toRGB. Each layer normalises its input by a running RMS (``magnitude_ema``), applies a modulated 3x3 (T) or
  1x1 (R) convolution with demodulation, then the filtered leaky ReLU: upsample with a Kaiser low-pass to twice
  the higher rate, leaky ReLU, Kaiser (T) or jinc (R, except in critical layers) low-pass and downsample. The
  final toRGB is a 1x1 modulated convolution to one channel, the image scaled by 0.25.
- Discriminator: StyleGAN2's residual one (``StyleGAN2Discriminator``, with its ``dp_compatible`` form), as NVlabs
  trains StyleGAN3; the registry builds it.
- Class-conditional (``c_dim > 0``): the labels enter StyleGAN2's mapping network (embedded, normalised, concatenated
  to z) and the discriminator is StyleGAN2's conditional one, as in NVlabs.

The filtered nonlinearity is plain PyTorch (NVlabs' reference path of ``filtered_lrelu``, not the CUDA op): a
transposed convolution does the upsampling (zero insertion without multiplying the zeros), a strided convolution
the downsampling, with depthwise kernels (one 2-D kernel in NHWC on CPU, two 1-D passes in NCHW on CUDA: each the
faster there), and the clamped leaky ReLU keeps only its output for backward. Training settings of NVlabs' StyleGAN3 (the presets configs/stylegan3-*.toml):
lazy R1 with γ = 0.5 at 128 px, ∝ resolution² (0.125 at 64 px, 2 at 256 px), no path-length regularisation,
no style mixing, G lr 0.0025, D lr 0.002, magnitude EMA decay 0.5 ** (batch / 20000). Not reproduced: their
config-R blur of the discriminator's images during the first 200 kimg, and fp16 (bf16 autocast applies instead;
the Fourier features are computed in float32 under it).

Checked against NVlabs' code (github.com/NVlabs/stylegan3 at c233a91, run on the CPU with their reference ops),
loading their generator's state into this one by a name mapping (``mapping.fc{i}`` -> ``mapping.layers.{i}``,
``synthesis.L{i}_*`` -> ``synthesis.layers.{i}``), with random magnitude EMAs, biases, input affine and w_avg:

- Parameter counts equal for every setting tried, e.g. (z = w = 512; R with fmap_base and fmap_max doubled, as
  their stylegan3-r): fmap_base 32768 / fmap_max 512 (their default) T 37,767,173 / R 24,151,045 at 64 px,
  T 28,471,875 / R 18,815,873 at 256 px, T 22,313,101 / R 15,093,021 at 1024 px (the test pins these and more).
- Images for the same ws (truncation 0.7), eval mode, with a user transform, and training mode (EMA updates):
  max |difference| 1.6e-7 / 1.3e-7 / 2.6e-7 (T) and 8.9e-8 / 7.5e-8 / 8.2e-8 (R) at 64 px, fmap_base 2048,
  fmap_max 128, for images of max |x| 0.10 and 0.08; 3.7e-8 (T) and 3.1e-8 (R) at 256 px, fmap_base 2048,
  fmap_max 64 (max |x| 0.06 and 0.006, untrained). Filters, EMA buffers and ws equal exactly.

  Command (scratch script kept outside the repository; NVlabs' code under /work/scratch/sg3-ref)::

      cd /work/scratch/sg3-ref && PYTHONPATH=/work/scratch/sg3-shim:. ../../wt-sg3/.venv/bin/python \\
          sg3_compare.py cmp,t,64,2048,128 cmp,r,64,2048,128 cmp,t,256,2048,64 cmp,r,256,2048,64

Speed of one training step (batch 32, lazy R1, G EMA) on the project's 2-core CPU: 1.9 images/s with
configs/stylegan3-64.toml (fmap_base 2048, fmap_max 128), 4.4 at fmap_base 1024, fmap_max 64, against 4.7 for
configs/stylegan2-64.toml; NVlabs' reference ops take twice this module's time for G's forward. On an H200 (bf16
autocast, a trainer-like step): 246 images/s at 64 px (T; R 119), 42 at 256 px with configs/stylegan3-256.toml's
widths (R 20). There, CUDA and CPU images agree to 7e-7 in float32; under bf16 autocast the EQ-T PSNR of the
equivariance test falls from 69 dB to 53-54 dB (StyleGAN2: 42 dB in float32).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsyngan.models.layers import EqualizedLinear, fir_decimate, fir_interpolate, modulated_conv2d
from medsyngan.models.stylegan2 import MappingNetwork

SUPPORTED_RESOLUTIONS = (64, 128, 256, 512, 1024)

Config = Literal["t", "r"]

# The paper's design constants (NVlabs' defaults for every resolution).
NUM_CRITICAL = 2  # critically sampled layers before toRGB
FIRST_CUTOFF = 2.0  # f_c of the first layer
FIRST_STOPBAND = 2**2.1  # f_t of the first layer
LAST_STOPBAND_REL = 2**0.3  # f_t of the last layer, relative to its cutoff
MARGIN = 10  # pixels computed beyond each side of the image until the last two layers
FILTER_SIZE = 6  # taps of a resampling filter per sample of the lower rate
LRELU_UPSAMPLING = 2  # the leaky ReLU runs at this multiple of the layer's higher sampling rate
CONV_CLAMP = 256.0  # activations clamped to ±this after the nonlinearity
OUTPUT_SCALE = 0.25


def lowpass_filter(numtaps: int, cutoff: float, width: float, fs: float, radial: bool = False) -> torch.Tensor:
    """Kaiser-windowed low-pass FIR: (numtaps,), applied along both axes, or (numtaps, numtaps) radially symmetric.

    ``cutoff`` and the transition band ``width`` are in the units of the sampling rate ``fs``. The radial filter is
    the jinc (the ideal low-pass of a disc, J1(2 pi fc r) / r) under the outer product of the Kaiser window.
    """
    import scipy.signal
    import scipy.special

    if not radial:
        return torch.as_tensor(scipy.signal.firwin(numtaps, cutoff, width=width, fs=fs), dtype=torch.float32)
    t = (np.arange(numtaps) - (numtaps - 1) / 2) / fs
    r = np.hypot(t[:, None], t[None, :])
    f = scipy.special.j1(2 * np.pi * cutoff * r) / r
    beta = scipy.signal.kaiser_beta(scipy.signal.kaiser_atten(numtaps, width / (fs / 2)))
    window = np.kaiser(numtaps, beta)
    f = f * np.outer(window, window)
    return torch.as_tensor(f / f.sum(), dtype=torch.float32)


class _ClampedLeakyReLU(torch.autograd.Function):
    """clamp(leaky_relu(x, 0.2), ±CONV_CLAMP), keeping only its output for the backward pass.

    Both derivatives can be read off the output (its sign, and whether it sits at the clamp), so the upsampled
    map is saved once, shared with the decimating convolution that saves the same tensor, instead of three times.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = F.hardtanh(F.leaky_relu(x, 0.2), -CONV_CLAMP, CONV_CLAMP)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        grad = torch.ops.aten.hardtanh_backward(grad, y, -CONV_CLAMP, CONV_CLAMP)
        return torch.ops.aten.leaky_relu_backward(grad, y, 0.2, True)


def filtered_lrelu(
    x: torch.Tensor, up_filter: torch.Tensor, down_filter: torch.Tensor, bias: torch.Tensor, up: int, down: int,
    padding: tuple[int, int, int, int],
) -> torch.Tensor:
    """Bias, upsample ×up with a low-pass, leaky ReLU (slope 0.2, gain sqrt 2, clamped), low-pass, downsample ×down.

    The nonlinearity's new frequencies above the output band are removed at the higher rate before decimation,
    which is what keeps the layer alias-free (the paper's section 3.2). The gain rides on the interpolation
    filter (the leaky ReLU commutes with a positive scale), sparing a pass over the upsampled map.
    """
    x = fir_interpolate(x + bias[:, None, None].to(x.dtype), up_filter, up, padding, gain=math.sqrt(2.0))
    return fir_decimate(_ClampedLeakyReLU.apply(x), down_filter, down)


def layer_schedule(resolution: int, num_layers: int, fmap_base: int, fmap_max: int, nc: int) -> dict[str, list]:
    """Per-layer cutoff, transition half-width, sampling rate, size and channels (the paper's Appendix F).

    Entry i describes the output of synthesis layer i (0..num_layers, the last being toRGB); the Fourier-feature
    input shares entry 0. Cutoff and minimum stopband grow geometrically from ``FIRST_CUTOFF`` and
    ``FIRST_STOPBAND`` to R/2 and R/2 · ``LAST_STOPBAND_REL``, reached ``NUM_CRITICAL`` layers before toRGB; the
    sampling rate is the smallest power of two at least twice the stopband (at most R, so the last layers are
    critically sampled); the transition band reaches from the cutoff to the stopband or to half the rate,
    whichever is higher. Maps carry ``MARGIN`` extra pixels per side, cropped by the last layer before toRGB.
    Channels are ``fmap_base / (2 cutoff)`` capped at ``fmap_max`` (at least 1); toRGB's are ``nc``.
    """
    last_cutoff = resolution / 2
    last_stopband = last_cutoff * LAST_STOPBAND_REL
    progress = np.minimum(np.arange(num_layers + 1) / (num_layers - NUM_CRITICAL), 1.0)
    cutoffs = FIRST_CUTOFF * (last_cutoff / FIRST_CUTOFF) ** progress
    stopbands = FIRST_STOPBAND * (last_stopband / FIRST_STOPBAND) ** progress
    rates = np.exp2(np.ceil(np.log2(np.minimum(2 * stopbands, resolution))))
    sizes = rates + 2 * MARGIN
    sizes[-2:] = resolution
    ch = np.maximum(np.rint(np.minimum(fmap_base / 2 / cutoffs, fmap_max)), 1)
    ch[-1] = nc
    return {
        "cutoff": cutoffs.tolist(),
        "half_width": (np.maximum(stopbands, rates / 2) - cutoffs).tolist(),
        "rate": [int(v) for v in rates],
        "size": [int(v) for v in sizes],
        "channels": [int(v) for v in ch],
    }


class SynthesisInput(nn.Module):
    """w -> (B, C, S, S) Fourier features, rotated and translated by an affine of w and the user's ``transform``.

    C frequencies drawn uniformly in the disc of radius ``bandwidth`` with random phases, sampled on an S x S grid
    at ``rate`` samples per unit (the image is the unit square) and mixed by a trainable C x C matrix. ``transform``
    (3 x 3, identity by default) is the inverse of a transformation applied to the output image: setting its
    translation to -t moves the image by t (in image widths). Frequencies the transform pushes above ``bandwidth``
    fade out linearly towards half the rate.
    """

    def __init__(self, w_dim: int, channels: int, size: int, rate: float, bandwidth: float):
        super().__init__()
        self.size, self.rate, self.bandwidth = size, rate, bandwidth
        angle = torch.rand(channels) * (2 * math.pi)
        radius = torch.rand(channels).sqrt() * bandwidth  # sqrt: uniform density over the disc's area
        self.register_buffer("freqs", torch.stack([angle.cos(), angle.sin()], dim=1) * radius[:, None])
        self.register_buffer("phases", torch.rand(channels) - 0.5)
        self.register_buffer("transform", torch.eye(3))
        self.weight = nn.Parameter(torch.randn(channels, channels))
        self.affine = EqualizedLinear(w_dim, 4)
        with torch.no_grad():  # the identity transform (rotation cos 1, sin 0; no translation) at initialisation
            self.affine.weight.zero_()
            self.affine.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # Phases are products of frequencies and coordinates of tens of units: bf16 would lose the sub-pixel shifts.
        with torch.autocast(w.device.type, enabled=False):
            cos, sin, tx, ty = self.affine(w.float()).unbind(1)
            norm = torch.sqrt(cos.square() + sin.square())
            cos, sin, tx, ty = cos / norm, sin / norm, tx / norm, ty / norm
            zero, one = torch.zeros_like(cos), torch.ones_like(cos)
            rotate = torch.stack([cos, -sin, zero, sin, cos, zero, zero, zero, one], 1).reshape(-1, 3, 3)
            shift = torch.stack([one, zero, -tx, zero, one, -ty, zero, zero, one], 1).reshape(-1, 3, 3)
            m = rotate @ shift @ self.transform  # inverse transforms of the image: rotation, translation, user's
            phases = self.phases + (self.freqs @ m[:, :2, 2:]).squeeze(2)  # (B, C)
            freqs = self.freqs @ m[:, :2, :2]  # (B, C, 2)
            amplitude = (1 - (freqs.norm(dim=2) - self.bandwidth) / (self.rate / 2 - self.bandwidth)).clamp(0, 1)
            coords = (torch.arange(self.size, device=w.device, dtype=torch.float32) + 0.5 - self.size / 2) / self.rate
            x = (freqs[:, :, 0, None, None] * coords + freqs[:, :, 1, None, None] * coords[:, None]
                 + phases[:, :, None, None])
            x = torch.sin(x * (2 * math.pi)) * amplitude[:, :, None, None]
        weight = self.weight / math.sqrt(self.weight.shape[1])
        return torch.nn.functional.conv2d(x, weight[:, :, None, None].to(x.dtype))


class SynthesisLayer(nn.Module):
    """Modulated convolution, magnitude normalisation, filtered leaky ReLU; or, as ``torgb``, the linear output layer.

    The input is divided by the running RMS of its values (``magnitude_ema``, decay ``magnitude_ema_beta``, updated
    in training mode) in place of StyleGAN2's noise-and-normalisation balance. The convolution is "full" (the map
    grows by k - 1), then up to the temporary rate (``LRELU_UPSAMPLING`` × the higher of the two rates), leaky
    ReLU, and down to the output rate; the padding places the samples so that the output has ``out_size`` pixels
    centred like the input's (the paper's Appendix C.3), cropping the margin where the size shrinks. toRGB is a
    1x1 modulated convolution without demodulation (style scaled by 1/sqrt(fan_in)) plus bias, clamped.
    """

    def __init__(
        self, w_dim: int, torgb: bool, critical: bool, in_channels: int, out_channels: int, in_size: int,
        out_size: int, in_rate: int, out_rate: int, in_cutoff: float, out_cutoff: float, in_half_width: float,
        out_half_width: float, conv_kernel: int, use_radial_filters: bool, magnitude_ema_beta: float,
        fused: bool | None,
    ):
        super().__init__()
        self.torgb, self.fused, self.magnitude_ema_beta = torgb, fused, magnitude_ema_beta
        self.conv_kernel = k = 1 if torgb else conv_kernel
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, k, k))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("magnitude_ema", torch.ones(()))
        self.weight_gain = 1.0 / math.sqrt(in_channels * k * k)
        if torgb:
            return
        tmp_rate = max(in_rate, out_rate) * LRELU_UPSAMPLING
        self.up, self.down = tmp_rate // in_rate, tmp_rate // out_rate
        up_taps, down_taps = FILTER_SIZE * self.up, FILTER_SIZE * self.down
        radial = use_radial_filters and not critical
        self.register_buffer("up_filter", lowpass_filter(up_taps, in_cutoff, 2 * in_half_width, tmp_rate), False)
        self.register_buffer(
            "down_filter", lowpass_filter(down_taps, out_cutoff, 2 * out_half_width, tmp_rate, radial), False
        )
        # Padding that turns (in_size + k - 1) input samples, upsampled and shrunk by both filters, into exactly
        # out_size samples after decimation; the extra up/2 keeps sample positions centred.
        total = (out_size - 1) * self.down + 1 - (in_size + k - 1) * self.up + up_taps + down_taps - 2
        lo = (total + self.up) // 2
        self.padding = (lo, total - lo, lo, total - lo)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                magnitude = x.detach().float().square().mean()
                self.magnitude_ema.copy_(magnitude.lerp(self.magnitude_ema, self.magnitude_ema_beta))
        styles = self.affine(w)
        weight = self.weight
        if self.torgb:
            styles = styles * self.weight_gain
        else:
            # Demodulation cancels both scales; bringing them to unit RMS first keeps low-precision products in range.
            weight = weight * weight.square().mean(dim=(1, 2, 3), keepdim=True).rsqrt()
            styles = styles * styles.square().mean(dim=1, keepdim=True).rsqrt()
        fused = (not self.training) if self.fused is None else self.fused
        x = modulated_conv2d(x, weight, styles, demodulate=not self.torgb, fused=fused, padding=self.conv_kernel - 1)
        x = x * self.magnitude_ema.rsqrt().to(x.dtype)  # the convolution is linear: same as scaling its input
        if self.torgb:
            return (x + self.bias[:, None, None].to(x.dtype)).clamp(-CONV_CLAMP, CONV_CLAMP)
        return filtered_lrelu(x, self.up_filter, self.down_filter, self.bias, self.up, self.down, self.padding)


class SynthesisNetwork(nn.Module):
    """ws (B, num_ws, w_dim) -> image (B, nc, R, R); ``num_ws`` = num_layers + 2 (input, layers, toRGB)."""

    def __init__(
        self, resolution: int, w_dim: int, fmap_base: int, fmap_max: int, nc: int, num_layers: int,
        conv_kernel: int, use_radial_filters: bool, magnitude_ema_beta: float, fused: bool | None,
    ):
        super().__init__()
        if num_layers <= NUM_CRITICAL:
            raise ValueError(f"StyleGAN3 needs more than {NUM_CRITICAL} layers, got {num_layers}")
        self.resolution, self.w_dim, self.num_ws = resolution, w_dim, num_layers + 2
        s = layer_schedule(resolution, num_layers, fmap_base, fmap_max, nc)
        self.input = SynthesisInput(w_dim, s["channels"][0], s["size"][0], s["rate"][0], s["cutoff"][0])
        self.layers = nn.ModuleList()
        for i in range(num_layers + 1):
            p = max(i - 1, 0)  # layer 0 keeps the input's rate and band
            self.layers.append(SynthesisLayer(
                w_dim, torgb=i == num_layers, critical=i >= num_layers - NUM_CRITICAL,
                in_channels=s["channels"][p], out_channels=s["channels"][i], in_size=s["size"][p],
                out_size=s["size"][i], in_rate=s["rate"][p], out_rate=s["rate"][i], in_cutoff=s["cutoff"][p],
                out_cutoff=s["cutoff"][i], in_half_width=s["half_width"][p], out_half_width=s["half_width"][i],
                conv_kernel=conv_kernel, use_radial_filters=use_radial_filters,
                magnitude_ema_beta=magnitude_ema_beta, fused=fused,
            ))

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        if ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws of shape {tuple(ws.shape)}; expected (B, {self.num_ws}, {self.w_dim})")
        x = self.input(ws[:, 0])
        if x.device.type == "cpu":
            # The filtered nonlinearity's depthwise convolutions measured about 1.5x faster in NHWC with oneDNN (the
            # whole generator's forward and backward 15%); every later op keeps the layout. cuDNN wants NCHW.
            x = x.contiguous(memory_format=torch.channels_last)
        for i, layer in enumerate(self.layers):
            x = layer(x, ws[:, i + 1])
        return x * OUTPUT_SCALE


class StyleGAN3Generator(nn.Module):
    """z (B, z_dim) -> image (B, 1, R, R); ``mapping`` and ``synthesis`` are usable separately.

    Args:
        resolution: output side, a power of two from 64 to 1024.
        z_dim, w_dim: latent sizes (NVlabs: 512, 512).
        mapping_layers: mapping network depth (NVlabs: 2 for StyleGAN3).
        fmap_base, fmap_max: channels of a layer with cutoff f_c are ``min(fmap_base / (2 f_c), fmap_max)``,
            which at the last layers (f_c = R/2) is StyleGAN2's ``fmap_base / R``.
        nc: image channels.
        config: "t" (translation equivariant: 3x3 convolutions) or "r" (rotation equivariant too: 1x1
            convolutions, radially symmetric downsampling filters in the non-critical layers, and twice
            ``fmap_base`` and ``fmap_max``, as NVlabs' stylegan3-r).
        num_layers: synthesis layers between the Fourier-feature input and toRGB (NVlabs: 14 at every resolution).
        magnitude_ema_beta: decay of each layer's running input magnitude (NVlabs' network default 0.999; their
            training script uses 0.5 ** (batch / 20000), 0.9989 at batch 32).
        mapping_lr_mul, w_avg_beta: mapping network learning-rate multiplier (0.01) and w_avg decay (0.998).
        fused_modconv: as for StyleGAN2 (None: grouped convolution in eval mode, shared weights in training).
        c_dim: length of the label vector (0: unconditional), given to ``mapping`` and ``forward`` as ``c``.
    """

    def __init__(
        self, resolution: int = 256, z_dim: int = 512, w_dim: int = 256, mapping_layers: int = 2,
        fmap_base: int = 4096, fmap_max: int = 256, nc: int = 1, config: Config = "t", num_layers: int = 14,
        magnitude_ema_beta: float = 0.999, mapping_lr_mul: float = 0.01, w_avg_beta: float = 0.998,
        fused_modconv: bool | None = None, c_dim: int = 0,
    ):
        super().__init__()
        if resolution not in SUPPORTED_RESOLUTIONS:
            raise ValueError(f"StyleGAN3 resolution {resolution} not in {SUPPORTED_RESOLUTIONS}")
        if config not in ("t", "r"):
            raise ValueError(f"StyleGAN3 config '{config}' is not 't' or 'r'")
        self.resolution, self.z_dim, self.w_dim, self.config, self.c_dim = resolution, z_dim, w_dim, config, c_dim
        widen = 2 if config == "r" else 1
        self.synthesis = SynthesisNetwork(
            resolution, w_dim, fmap_base * widen, fmap_max * widen, nc, num_layers,
            conv_kernel=1 if config == "r" else 3, use_radial_filters=config == "r",
            magnitude_ema_beta=magnitude_ema_beta, fused=fused_modconv,
        )
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, w_dim, self.num_ws, mapping_layers, mapping_lr_mul, w_avg_beta, c_dim)

    def forward(
        self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
        c: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.synthesis(self.mapping(z, truncation_psi, truncation_cutoff, c=c))
