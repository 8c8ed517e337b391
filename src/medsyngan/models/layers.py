"""Building blocks shared by the networks: equalized learning rate, pixel norm, minibatch-stddev, FIR resampling,
modulated convolution (ProGAN, StyleGAN2, StyleGAN3), and the check of a conditional network's label batch.

Equalized learning rate (Karras et al. 2018): parameters are stored N(0, 1) and scaled at run time by
``gain * lr_mul / sqrt(fan_in)``, so that Adam's per-parameter step size acts the same on every layer. The scaled
weight is used through ``F.conv2d``/``F.linear`` on the registered parameter, so autograd (and Opacus' functorch
per-sample path) sees an ordinary differentiable function of that parameter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)


def channels(resolution: int, fmap_base: int, fmap_max: int) -> int:
    """Feature maps at a resolution: ``fmap_base / resolution``, capped at ``fmap_max``, at least 1."""
    return max(1, min(fmap_base // resolution, fmap_max))


def label_batch(c: torch.Tensor | None, like: torch.Tensor, c_dim: int) -> torch.Tensor:
    """The label batch (B, c_dim) of a conditional network, checked against the batch ``like`` it goes with."""
    if c is None or c.shape != (like.shape[0], c_dim):
        got = "none" if c is None else tuple(c.shape)
        raise ValueError(f"a conditional network needs labels of shape ({like.shape[0]}, {c_dim}), got {got}")
    return c.to(like.dtype)


def lrelu(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """LeakyReLU(0.2), out of place (Opacus' backward hooks need every layer's input intact)."""
    y = F.leaky_relu(x, 0.2)
    return y * gain if gain != 1.0 else y


class EqualizedLinear(nn.Module):
    """Fully connected layer with run-time weight scaling.

    Args:
        in_features, out_features: sizes.
        gain: scale of the effective weight's standard deviation (He: sqrt(2) before a LeakyReLU).
        lr_mul: learning-rate multiplier of this layer (StyleGAN's mapping network uses 0.01).
        bias_init: initial value of the stored bias; the effective bias is ``bias * lr_mul``.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, gain: float = 1.0, lr_mul: float = 1.0,
        bias_init: float = 0.0,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init))) if bias else None
        self.weight_gain = gain * lr_mul / math.sqrt(in_features)
        self.bias_gain = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and self.bias_gain != 1.0:
            bias = bias * self.bias_gain
        return F.linear(x, self.weight * self.weight_gain, bias)


class EqualizedConv2d(nn.Module):
    """2-D convolution with run-time weight scaling.

    Args:
        in_channels, out_channels, kernel_size: as ``nn.Conv2d``.
        gain: scale of the effective weight's standard deviation.
        stride: 1, or 2 for a strided (downsampling) convolution.
        padding: defaults to ``kernel_size // 2`` (same size at stride 1).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True, gain: float = 1.0,
        stride: int = 1, padding: int | None = None,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = gain / math.sqrt(in_channels * kernel_size * kernel_size)
        self.stride = stride
        self.padding = kernel_size // 2 if padding is None else padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.weight_gain, self.bias, stride=self.stride, padding=self.padding)


class PixelNorm(nn.Module):
    """Normalise each pixel's feature vector to unit RMS (ProGAN generator; StyleGAN's latent input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)


class MinibatchStdDev(nn.Module):
    """Append one feature map holding the standard deviation of features across a group of samples.

    It lets D see sample diversity (against mode collapse), and is exactly what makes one sample's logit depend on
    others, so DP-compatible discriminators leave it out. Groups are ``group_size`` samples (or the largest divisor
    of the batch size below it); sample i is in group ``i % (B // group)`` as in NVlabs' implementation.
    """

    def __init__(self, group_size: int = 4):
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = max(d for d in range(1, min(self.group_size, n) + 1) if n % d == 0)
        y = x.reshape(g, -1, c, h, w)
        y = (y - y.mean(dim=0)).square().mean(dim=0).add(1e-8).sqrt()
        y = y.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y], dim=1)


def fir_filter() -> torch.Tensor:
    """The [1, 3, 3, 1] binomial low-pass filter of StyleGAN2, 4x4, summing to 1."""
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    f = torch.outer(f, f)
    return f / f.sum()


def _depthwise(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return f.to(x.dtype)[None, None].expand(x.shape[1], 1, *f.shape)


def fir_blur(x: torch.Tensor, f: torch.Tensor, pad: int, gain: float = 1.0) -> torch.Tensor:
    """Filter every channel with ``f`` (symmetric, so correlation equals convolution), zero-padding ``pad``."""
    return F.conv2d(x, _depthwise(f * gain, x), padding=pad, groups=x.shape[1])


def fir_downsample(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Low-pass then keep every second pixel: H -> H/2."""
    return F.conv2d(x, _depthwise(f, x), stride=2, padding=1, groups=x.shape[1])


def fir_upsample(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Zero-insert then low-pass (gain 4 keeps the mean): H -> 2H."""
    return F.conv_transpose2d(x, _depthwise(f * 4, x), stride=2, padding=1, groups=x.shape[1])


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    demodulate: bool = True,
    up: bool = False,
    resample_filter: torch.Tensor | None = None,
    fused: bool = True,
    padding: int | None = None,
) -> torch.Tensor:
    """StyleGAN2's modulated convolution (Karras et al. 2020, eqs. 1–3).

    Each sample's weight is ``weight * styles`` over input channels; with ``demodulate`` every output channel of it
    is rescaled to unit L2 norm, which keeps the output at unit variance for unit-variance input in place of
    AdaIN's instance normalisation. ``fused`` runs all samples as one grouped convolution (groups = batch) with
    per-sample weights; otherwise it scales the activations before and after a shared-weight convolution, which is
    mathematically identical and often faster on GPUs during training. ``up`` doubles the resolution with a
    stride-2 transposed convolution followed by the FIR low-pass. ``padding`` (default ``k // 2``, same size) applies
    without ``up``; StyleGAN3 uses ``k - 1``, a full convolution that grows the map by ``k - 1``.

    x: (B, C, H, W); weight: (O, C, k, k); styles: (B, C).
    """
    b, c, h, w = x.shape
    o, _, k, _ = weight.shape
    pad = k // 2 if padding is None else padding
    wb = weight[None] * styles[:, None, :, None, None]  # (B, O, C, k, k)
    dcoefs = (wb.square().sum(dim=(2, 3, 4)) + 1e-8).rsqrt() if demodulate else None  # (B, O)
    if fused:
        if dcoefs is not None:
            wb = wb * dcoefs[:, :, None, None, None]
        xg = x.reshape(1, b * c, h, w)
        if up:
            y = F.conv_transpose2d(xg, wb.transpose(1, 2).reshape(b * c, o, k, k), stride=2, groups=b)
        else:
            y = F.conv2d(xg, wb.reshape(b * o, c, k, k), padding=pad, groups=b)
        y = y.reshape(b, o, *y.shape[2:])
    else:
        xs = x * styles[:, :, None, None]
        if up:
            y = F.conv_transpose2d(xs, weight.transpose(0, 1), stride=2)
        else:
            y = F.conv2d(xs, weight, padding=pad)
        if dcoefs is not None:
            y = y * dcoefs[:, :, None, None]
    if up:
        # The transposed convolution gives 2H + k - 2 pixels; the 4-tap low-pass with one pixel of padding on each
        # side (for k = 3) brings it to 2H, and gain 4 restores the mean lost to zero insertion.
        assert resample_filter is not None
        y = fir_blur(y, resample_filter, pad=(k - 1) // 2, gain=4.0)
    return y


def _two_pass(f: torch.Tensor, x: torch.Tensor, two_pass: bool | None) -> bool:
    # cuDNN's depthwise kernels run two 1-D passes of a separable filter faster than its 2-D outer product, and
    # in NCHW (1.6-2x on an H200); oneDNN on CPU is the other way round (2x on the project's 2-core CPU).
    return f.ndim == 1 and (x.is_cuda if two_pass is None else two_pass)


def fir_interpolate(
    x: torch.Tensor, f: torch.Tensor, up: int, padding: tuple[int, int, int, int], gain: float = 1.0,
    two_pass: bool | None = None,
) -> torch.Tensor:
    """Upsample ×``up`` by zero insertion, pad by ``padding`` = (left, right, top, bottom) (negative: crop) and
    filter with the symmetric low-pass ``f``: (T,) along both axes or (T, T); ``gain`` on top of the ``up ** 2``
    that keeps the mean. ``two_pass`` (None: on CUDA) filters a (T,) filter in two 1-D passes, else as one 2-D one.

    A transposed convolution of stride ``up`` gives the same samples without multiplying the inserted zeros; the
    padding then picks the window of its output: output o of the padded signal is sample o + T - 1 - pad_before
    of the transposed convolution (outside it, zeros).
    """
    c, h, w = x.shape[1:]
    t = f.shape[0]
    if _two_pass(f, x, two_pass):
        f = f * (up * math.sqrt(gain))
        x = F.conv_transpose2d(x.contiguous(), _depthwise(f[None, :], x), stride=(1, up), groups=c)
        x = F.conv_transpose2d(x, _depthwise(f[:, None], x), stride=(up, 1), groups=c)
    else:
        f = torch.outer(f, f) if f.ndim == 1 else f
        x = F.conv_transpose2d(x, _depthwise(f * (gain * up * up), x), stride=up, groups=c)
    left, right, top, bottom = padding
    out_w, out_h = w * up + left + right - t + 1, h * up + top + bottom - t + 1
    sx, sy = t - 1 - left, t - 1 - top
    return F.pad(x, (-sx, sx + out_w - x.shape[3], -sy, sy + out_h - x.shape[2]))


def fir_decimate(x: torch.Tensor, f: torch.Tensor, down: int, two_pass: bool | None = None) -> torch.Tensor:
    """Filter with the symmetric low-pass ``f`` ((T,) along both axes, or (T, T)) without padding, keeping every
    ``down``-th sample: a strided convolution, so the dropped samples are never computed. ``two_pass`` as for
    :func:`fir_interpolate`."""
    c = x.shape[1]
    if _two_pass(f, x, two_pass):
        x = F.conv2d(x.contiguous(), _depthwise(f[None, :], x), stride=(1, down), groups=c)
        return F.conv2d(x, _depthwise(f[:, None], x), stride=(down, 1), groups=c)
    f = torch.outer(f, f) if f.ndim == 1 else f
    return F.conv2d(x, _depthwise(f, x), stride=down, groups=c)
