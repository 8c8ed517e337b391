"""StyleGAN2 (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN"), greyscale.

Config-F-like structure at a narrow default width, following NVlabs' stylegan2-ada-pytorch:

- Mapping network: z normalised to unit second moment, ``mapping_layers`` equalized fully connected layers
  (learning-rate multiplier 0.01) with LeakyReLU, producing w; broadcast to ``num_ws`` per-layer copies. A running
  mean ``w_avg`` (decay ``w_avg_beta``) is tracked in training mode for the truncation trick
  ``w' = w_avg + psi (w - w_avg)``, applied to the first ``truncation_cutoff`` ws (all by default).
- Synthesis network: learned constant 4x4 input; per resolution two 3x3 modulated convolutions with weight
  demodulation (the first upsamples 2x), each followed by per-pixel noise with a learned strength, bias and
  LeakyReLU (scaled by sqrt(2)); skip architecture: a 1x1 unmodulated-demodulation toRGB at every resolution,
  upsampled with the [1, 3, 3, 1] FIR filter and summed. The ws are consumed as in NVlabs: ``num_ws`` =
  2 log2(R) - 2, the toRGB of a resolution sharing its w with the next resolution's first convolution.
- Discriminator: residual. fromRGB at the input resolution, then per resolution conv 3x3, conv 3x3 down
  (FIR low-pass then stride 2) plus a 1x1 skip on the FIR-downsampled input, summed with gain sqrt(1/2); at 4x4
  minibatch standard deviation, conv 3x3, fully connected, fully connected to one logit.

Equalized learning rate everywhere. Channels at resolution r are ``min(fmap_base / r, fmap_max)``; config F at
256 px is fmap_base=16384 (NVlabs' channel_base 32768 counts 2x), fmap_max=512.

Style mixing is done by the trainer on ws: map two latents, pick a crossover index ``k`` in ``[1, num_ws)``, and
synthesise ``torch.cat([ws1[:, :k], ws2[:, k:]], dim=1)`` (map the second latent with ``update_w_avg=False`` so
that only the main latents drive ``w_avg``, as NVlabs does).

DP-compatible discriminator (``dp_compatible=True``): minibatch-stddev is left out (the epilogue convolution takes
one channel fewer); the residual D has no normalisation layers and its activations are out of place, so nothing
else mixes samples. The generator is unchanged (DP-SGD applies to D only).

Class-conditional networks (``c_dim > 0``, a label vector of :mod:`medsyngan.data.labels`), as NVlabs does: the
mapping network embeds c with a fully connected layer (``w_dim`` features, learning rate 1), normalises it to unit
second moment like z and maps the concatenation [z, embed(c)]; the discriminator maps c alone through a mapping
network of its own (no z, no w_avg) to ``cmap`` (the channels at 4x4), its last layer outputs ``cmap`` features
instead of one, and the logit is the projection ⟨out(x), cmap(c)⟩ / √cmap. StyleGAN3 shares this mapping network.
With ``c_dim = 0`` nothing is added.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from medsyngan.models.layers import (
    SQRT2,
    EqualizedConv2d,
    EqualizedLinear,
    MinibatchStdDev,
    channels,
    fir_blur,
    fir_downsample,
    fir_filter,
    fir_upsample,
    label_batch,
    lrelu,
    modulated_conv2d,
)

SUPPORTED_RESOLUTIONS = tuple(2**k for k in range(3, 11))  # 8 ... 1024

NoiseMode = Literal["random", "const", "none"]


def _octaves(resolution: int) -> list[int]:
    if resolution not in SUPPORTED_RESOLUTIONS:
        raise ValueError(f"StyleGAN2 resolution {resolution} not in {SUPPORTED_RESOLUTIONS}")
    return [2**k for k in range(2, int(math.log2(resolution)) + 1)]


class MappingNetwork(nn.Module):
    """z (B, z_dim) [and labels c (B, c_dim)] -> ws (B, num_ws, w_dim), or (B, w_dim) when ``num_ws`` is None.

    Args:
        z_dim, w_dim: latent sizes (z_dim may be 0 for a mapping of labels alone: the conditional D's).
        num_ws: copies of w to broadcast (one per synthesis layer input); None returns w itself.
        num_layers: depth (NVlabs: 8 at 1024 px; 2 is enough at 64–256 px, as in their low-resolution configs).
        lr_mul: learning-rate multiplier of every layer (0.01).
        w_avg_beta: decay of the running mean of w used for truncation; None: no running mean (the D's mapping).
        c_dim: length of the label vector (0: unconditional); the labels are embedded to ``w_dim`` features.
    """

    def __init__(
        self, z_dim: int, w_dim: int, num_ws: int | None, num_layers: int = 2, lr_mul: float = 0.01,
        w_avg_beta: float | None = 0.995, c_dim: int = 0,
    ):
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws, self.w_avg_beta, self.c_dim = z_dim, w_dim, num_ws, w_avg_beta, c_dim
        embed = w_dim if c_dim else 0
        sizes = [z_dim + embed] + [w_dim] * num_layers
        self.layers = nn.ModuleList(EqualizedLinear(a, b, lr_mul=lr_mul) for a, b in zip(sizes[:-1], sizes[1:]))
        if w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros(w_dim))
        if c_dim:
            self.embed = EqualizedLinear(c_dim, embed)

    def forward(
        self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
        update_w_avg: bool | None = None, c: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``update_w_avg`` defaults to ``self.training``: the running mean follows training, not sampling."""
        parts = [_normalize(z)] if self.z_dim else []
        if self.c_dim:
            parts.append(_normalize(self.embed(label_batch(c, z, self.c_dim))))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        for layer in self.layers:
            x = lrelu(layer(x), SQRT2)
        if self.w_avg_beta is None:
            return x
        if self.training if update_w_avg is None else update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().float().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        ws = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1.0:
            avg = self.w_avg.to(ws.dtype)
            cut = self.num_ws if truncation_cutoff is None else truncation_cutoff
            ws = torch.cat([avg.lerp(ws[:, :cut], truncation_psi), ws[:, cut:]], dim=1)
        return ws


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit second moment per sample (StyleGAN's normalisation of z and of the embedded labels)."""
    return x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution (optionally upsampling), noise, bias, LeakyReLU * sqrt(2)."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int, resolution: int, up: bool, fused: bool | None):
        super().__init__()
        self.resolution, self.up, self.fused = resolution, up, fused
        self.affine = EqualizedLinear(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.register_buffer("resample_filter", fir_filter(), persistent=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: NoiseMode) -> torch.Tensor:
        styles = self.affine(w)
        fused = (not self.training) if self.fused is None else self.fused
        x = modulated_conv2d(x, self.weight, styles, up=self.up, resample_filter=self.resample_filter, fused=fused)
        if noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype)
            x = x + noise * self.noise_strength
        elif noise_mode == "const":
            x = x + self.noise_const.to(x.dtype) * self.noise_strength
        return lrelu(x + self.bias[:, None, None].to(x.dtype), SQRT2)


class ToRGB(nn.Module):
    """Modulated 1x1 convolution without demodulation (style scaled by 1/sqrt(fan_in)), bias, linear."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int, fused: bool | None):
        super().__init__()
        self.fused = fused
        self.affine = EqualizedLinear(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.weight_gain = 1.0 / math.sqrt(in_ch)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        fused = (not self.training) if self.fused is None else self.fused
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused=fused)
        return x + self.bias[:, None, None].to(x.dtype)


class SynthesisBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, w_dim: int, resolution: int, nc: int, fused: bool | None):
        super().__init__()
        self.resolution = resolution
        if resolution == 4:
            self.const = nn.Parameter(torch.randn(out_ch, 4, 4))
            self.convs = nn.ModuleList([SynthesisLayer(out_ch, out_ch, w_dim, 4, up=False, fused=fused)])
        else:
            self.convs = nn.ModuleList([
                SynthesisLayer(in_ch, out_ch, w_dim, resolution, up=True, fused=fused),
                SynthesisLayer(out_ch, out_ch, w_dim, resolution, up=False, fused=fused),
            ])
        self.torgb = ToRGB(out_ch, nc, w_dim, fused)
        self.register_buffer("resample_filter", fir_filter(), persistent=False)

    @property
    def num_conv(self) -> int:
        return len(self.convs)

    def forward(
        self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor, noise_mode: NoiseMode
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ws: (B, num_conv + 1, w_dim), the last one for toRGB."""
        if x is None:
            x = self.const.to(ws.dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        for i, conv in enumerate(self.convs):
            x = conv(x, ws[:, i], noise_mode)
        y = self.torgb(x, ws[:, -1])
        img = y if img is None else fir_upsample(img, self.resample_filter).to(y.dtype) + y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws (B, num_ws, w_dim) -> image (B, nc, R, R)."""

    def __init__(self, resolution: int, w_dim: int, fmap_base: int, fmap_max: int, nc: int, fused: bool | None):
        super().__init__()
        self.resolution, self.w_dim = resolution, w_dim
        res = _octaves(resolution)
        ch = {r: channels(r, fmap_base, fmap_max) for r in res}
        self.blocks = nn.ModuleList(
            SynthesisBlock(ch[max(r // 2, 4)], ch[r], w_dim, r, nc, fused) for r in res
        )
        self.num_ws = sum(b.num_conv for b in self.blocks) + 1

    def forward(self, ws: torch.Tensor, noise_mode: NoiseMode = "random") -> torch.Tensor:
        if noise_mode not in ("random", "const", "none"):
            raise ValueError(f"noise_mode '{noise_mode}' is not one of 'random', 'const', 'none'")
        if ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws of shape {tuple(ws.shape)}; expected (B, {self.num_ws}, {self.w_dim})")
        x = img = None
        idx = 0
        for block in self.blocks:
            x, img = block(x, img, ws[:, idx : idx + block.num_conv + 1], noise_mode)
            idx += block.num_conv
        return img


class StyleGAN2Generator(nn.Module):
    """z (B, z_dim) -> image (B, 1, R, R); ``mapping`` and ``synthesis`` are usable separately.

    Args:
        resolution: output side, a power of two from 8 to 1024.
        z_dim, w_dim: latent sizes (config F: 512, 512).
        mapping_layers: mapping network depth (config F: 8; default 2).
        fmap_base, fmap_max: channels at resolution r are ``min(fmap_base / r, fmap_max)``.
        nc: image channels.
        mapping_lr_mul: learning-rate multiplier of the mapping network (0.01).
        w_avg_beta: decay of the tracked mean of w (0.995).
        fused_modconv: True: modulated convolutions as one grouped convolution with per-sample weights; False:
            activations scaled around a shared-weight convolution (same result, see ``layers.modulated_conv2d``);
            None (default): grouped in eval mode, shared-weight in training mode, as NVlabs does.
        c_dim: length of the label vector (0: unconditional), given to ``mapping`` and ``forward`` as ``c``.
    """

    def __init__(
        self, resolution: int = 256, z_dim: int = 512, w_dim: int = 256, mapping_layers: int = 2,
        fmap_base: int = 4096, fmap_max: int = 256, nc: int = 1, mapping_lr_mul: float = 0.01,
        w_avg_beta: float = 0.995, fused_modconv: bool | None = None, c_dim: int = 0,
    ):
        super().__init__()
        self.resolution, self.z_dim, self.w_dim, self.c_dim = resolution, z_dim, w_dim, c_dim
        self.synthesis = SynthesisNetwork(resolution, w_dim, fmap_base, fmap_max, nc, fused_modconv)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, w_dim, self.num_ws, mapping_layers, mapping_lr_mul, w_avg_beta, c_dim)

    def forward(
        self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
        noise_mode: NoiseMode = "random", c: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.synthesis(self.mapping(z, truncation_psi, truncation_cutoff, c=c), noise_mode)


class _DBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv0 = EqualizedConv2d(in_ch, in_ch, 3)
        self.conv1 = EqualizedConv2d(in_ch, out_ch, 3, stride=2, padding=0)
        self.skip = EqualizedConv2d(in_ch, out_ch, 1, bias=False)
        self.register_buffer("resample_filter", fir_filter(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.skip(fir_downsample(x, self.resample_filter))
        x = lrelu(self.conv0(x), SQRT2)
        # Low-pass with two pixels of padding, then a stride-2 3x3 convolution without padding: H -> H/2.
        x = lrelu(self.conv1(fir_blur(x, self.resample_filter, pad=2)), SQRT2)
        return (y + x) * math.sqrt(0.5)


class StyleGAN2Discriminator(nn.Module):
    """image (B, 1, R, R) -> logits (B,).

    Args:
        resolution: input side, a power of two from 8 to 1024.
        fmap_base, fmap_max: as for the generator.
        nc: image channels.
        mbstd_group: minibatch-stddev group size (4).
        dp_compatible: leave out minibatch-stddev (see the module docstring).
        c_dim: length of the label vector (0: unconditional).
        mapping_layers: depth of the label mapping of a conditional D.
    """

    def __init__(
        self, resolution: int = 256, fmap_base: int = 4096, fmap_max: int = 256, nc: int = 1, mbstd_group: int = 4,
        dp_compatible: bool = False, c_dim: int = 0, mapping_layers: int = 2,
    ):
        super().__init__()
        self.resolution, self.dp_compatible, self.c_dim = resolution, dp_compatible, c_dim
        res = _octaves(resolution)
        ch = {r: channels(r, fmap_base, fmap_max) for r in res}
        self.fromrgb = EqualizedConv2d(nc, ch[resolution], 1)
        self.blocks = nn.Sequential(*(_DBlock(ch[r], ch[r // 2]) for r in reversed(res[1:])))
        self.mbstd = None if dp_compatible else MinibatchStdDev(mbstd_group)
        self.conv = EqualizedConv2d(ch[4] + int(not dp_compatible), ch[4], 3)
        self.fc = EqualizedLinear(ch[4] * 16, ch[4])
        self.cmap_dim = ch[4] if c_dim else 1
        self.out = EqualizedLinear(ch[4], self.cmap_dim)
        if c_dim:
            self.mapping = MappingNetwork(0, self.cmap_dim, None, mapping_layers, w_avg_beta=None, c_dim=c_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        cmap = self.mapping(x, c=c) if self.c_dim else None
        x = self.blocks(lrelu(self.fromrgb(x), SQRT2))
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = lrelu(self.conv(x), SQRT2)
        x = lrelu(self.fc(x.flatten(1)), SQRT2)
        x = self.out(x)
        if cmap is None:
            return x.reshape(-1)
        return (x * cmap).sum(dim=1) / math.sqrt(self.cmap_dim)
