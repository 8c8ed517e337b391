"""ProGAN (Karras et al. 2018, "Progressive Growing of GANs"), greyscale.

Both networks are built for the target resolution but run at a *stage* resolution that the trainer raises from
4 px, octave by octave, with ``set_stage(resolution, alpha)``. While a new octave fades in (alpha from 0 to 1), the
output is the blend ``(1 - alpha) * old + alpha * new`` of the previous stage's path (G: upsampled by nearest
neighbour; D: input average-pooled) and the new block's path. At alpha = 0 the networks compute exactly the previous
stage's function. At a lower stage G outputs images at the stage resolution and D expects them there; the trainer
downsamples the real images. The stage and alpha are buffers, so ``state_dict`` (and every checkpoint) carries them;
a state without them (a federation's shared weights, which leave the stage to the round instruction) loads and keeps
the network's own stage.

Layers follow the paper: equalized learning rate everywhere (He gain sqrt(2), 1 for toRGB and D's output), pixel
norm after every generator convolution and on the latent, LeakyReLU(0.2), 1x1 toRGB / fromRGB per resolution,
nearest-neighbour upsampling, 2x2 average pooling, and minibatch standard deviation before D's last block. Channels
at resolution r are ``min(fmap_base / r, fmap_max)``.

DP-compatible discriminator (``dp_compatible=True``): the minibatch-stddev feature map is left out (it is the one
place where samples of a batch meet; D has no BatchNorm), so D's last convolution takes one channel fewer.
Everything else is per-sample already; activations are out of place.

Class-conditional networks (``c_dim > 0``, a label vector of :mod:`medsyngan.data.labels`): G concatenates an
equalized linear embedding of the labels (``LABEL_EMBED`` features, pixel-normed on its own like z) to the
pixel-normed latent; D is a projection discriminator (Miyato & Koyama 2018): the logit gains ⟨E c, h⟩ / √ch, h
the features after D's dense layer. Both embeddings belong to every stage. With ``c_dim = 0`` nothing is added.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medsyngan.models.layers import (SQRT2, EqualizedConv2d, EqualizedLinear, MinibatchStdDev, PixelNorm, channels,
                                     label_batch, lrelu)

SUPPORTED_RESOLUTIONS = tuple(2**k for k in range(3, 11))  # 8 ... 1024
LABEL_EMBED = 32  # at least the 22 components of the largest label vector
STAGE_BUFFERS = ("stage_res", "stage_alpha")


def is_stage_key(key: str) -> bool:
    """Whether a state key (``G.stage_res``, ``D.stage_alpha``, ...) is a network's stage rather than a weight."""
    return key.rpartition(".")[2] in STAGE_BUFFERS


def _octaves(resolution: int) -> list[int]:
    """4, 8, ..., resolution."""
    return [2**k for k in range(2, int(math.log2(resolution)) + 1)]


def _check(resolution: int) -> list[int]:
    if resolution not in SUPPORTED_RESOLUTIONS:
        raise ValueError(f"ProGAN resolution {resolution} not in {SUPPORTED_RESOLUTIONS}")
    return _octaves(resolution)


class _Staged(nn.Module):
    """Stage bookkeeping shared by G and D: buffers (so that state_dict carries them) and validation."""

    resolution: int

    def _init_stage(self) -> None:
        self.register_buffer("stage_res", torch.tensor(self.resolution, dtype=torch.int64))
        self.register_buffer("stage_alpha", torch.tensor(1.0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        for name in STAGE_BUFFERS:
            state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_stage(self, resolution: int, alpha: float = 1.0) -> None:
        """Run at ``resolution`` (a power of two from 4 to the target), the new octave blended in with ``alpha``."""
        if resolution not in _octaves(self.resolution):
            raise ValueError(f"stage resolution {resolution} not in {_octaves(self.resolution)}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"fade-in alpha {alpha} outside [0, 1]")
        self.stage_res.fill_(resolution)
        self.stage_alpha.fill_(1.0 if resolution == 4 else alpha)

    @property
    def stage_resolution(self) -> int:
        return int(self.stage_res.item())

    def _stage_modules(self, stage: int) -> list[nn.Module]:
        raise NotImplementedError

    def stage_parameters(self) -> list[nn.Parameter]:
        """The parameters the current stage uses; the rest get no gradient (``grad`` stays None).

        Opacus' DPOptimizer needs a per-sample gradient for every parameter that requires grad. Wrap the network
        with all parameters trainable (so that every layer gets its hooks), then at each stage set
        ``requires_grad`` to True for these parameters only.
        """
        return [p for m in self._stage_modules(self.stage_resolution) for p in m.parameters()]

    @property
    def alpha(self) -> float:
        return float(self.stage_alpha.item())


class _GBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv0 = EqualizedConv2d(in_ch, out_ch, 3, gain=SQRT2)
        self.conv1 = EqualizedConv2d(out_ch, out_ch, 3, gain=SQRT2)
        self.norm = PixelNorm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = self.norm(lrelu(self.conv0(x)))
        return self.norm(lrelu(self.conv1(x)))


class _GInput(nn.Module):
    """Latent -> 4x4: pixel-normed z (and embedded labels), a dense layer (gain sqrt(2)/4 as in the official code),
    a 3x3 conv."""

    def __init__(self, z_dim: int, ch: int, c_dim: int = 0):
        super().__init__()
        self.ch = ch
        embed = LABEL_EMBED if c_dim else 0
        self.dense = EqualizedLinear(z_dim + embed, ch * 16, gain=SQRT2 / 4)
        self.conv = EqualizedConv2d(ch, ch, 3, gain=SQRT2)
        self.norm = PixelNorm()
        self.embed = EqualizedLinear(c_dim, embed, bias=False) if c_dim else None

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(z[:, :, None, None])[:, :, 0, 0]
        if self.embed is not None:
            y = self.embed(label_batch(c, z, self.embed.weight.shape[1]))
            x = torch.cat([x, self.norm(y[:, :, None, None])[:, :, 0, 0]], dim=1)
        x = self.norm(lrelu(self.dense(x).reshape(-1, self.ch, 4, 4)))
        return self.norm(lrelu(self.conv(x)))


class ProGANGenerator(_Staged):
    """z (B, z_dim) -> image (B, 1, s, s) at the current stage resolution s (the target after construction).

    Args:
        resolution: target side, a power of two from 8 to 1024.
        z_dim: latent dimension (paper: 512).
        fmap_base, fmap_max: channels at resolution r are ``min(fmap_base / r, fmap_max)``; the paper's networks
            are fmap_base=16384, fmap_max=512.
        nc: image channels.
        c_dim: length of the label vector (0: unconditional).
    """

    def __init__(
        self, resolution: int = 256, z_dim: int = 512, fmap_base: int = 4096, fmap_max: int = 256, nc: int = 1,
        c_dim: int = 0,
    ):
        super().__init__()
        self.resolution, self.z_dim, self.c_dim = resolution, z_dim, c_dim
        res = _check(resolution)
        ch = {r: channels(r, fmap_base, fmap_max) for r in res}
        self.blocks = nn.ModuleDict({"4": _GInput(z_dim, ch[4], c_dim)})
        for r in res[1:]:
            self.blocks[str(r)] = _GBlock(ch[r // 2], ch[r])
        self.to_rgb = nn.ModuleDict({str(r): EqualizedConv2d(ch[r], nc, 1, gain=1.0) for r in res})
        self._init_stage()

    def _stage_modules(self, stage: int) -> list[nn.Module]:
        used = [self.blocks[str(r)] for r in _octaves(stage)] + [self.to_rgb[str(stage)]]
        return used + ([self.to_rgb[str(stage // 2)]] if stage > 4 else [])

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        stage = self.stage_resolution
        x = self.blocks["4"](z, c)
        prev = x
        r = 4
        while r < stage:
            r *= 2
            prev = x
            x = self.blocks[str(r)](x)
        img = self.to_rgb[str(stage)](x)
        if stage == 4:
            return img
        # Both paths are always computed and blended with the tensor alpha: the old path is one 1x1 convolution,
        # and no host-device synchronisation is needed to read alpha.
        old = F.interpolate(self.to_rgb[str(stage // 2)](prev), scale_factor=2.0, mode="nearest")
        return torch.lerp(old, img, self.stage_alpha.to(img.dtype))


class _DBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv0 = EqualizedConv2d(in_ch, in_ch, 3, gain=SQRT2)
        self.conv1 = EqualizedConv2d(in_ch, out_ch, 3, gain=SQRT2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(lrelu(self.conv1(lrelu(self.conv0(x)))), 2)


class _DOutput(nn.Module):
    """4x4 -> logit: [minibatch-stddev], 3x3 conv, dense, dense to one output (gain 1) [+ the label projection]."""

    def __init__(self, ch: int, mbstd: bool, mbstd_group: int, c_dim: int = 0):
        super().__init__()
        self.mbstd = MinibatchStdDev(mbstd_group) if mbstd else None
        self.conv = EqualizedConv2d(ch + int(mbstd), ch, 3, gain=SQRT2)
        self.dense = EqualizedLinear(ch * 16, ch, gain=SQRT2)
        self.out = EqualizedLinear(ch, 1, gain=1.0)
        self.embed = EqualizedLinear(c_dim, ch, bias=False) if c_dim else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = lrelu(self.conv(x))
        x = lrelu(self.dense(x.flatten(1)))
        logit = self.out(x).reshape(-1)
        if self.embed is None:
            return logit
        e = self.embed(label_batch(c, x, self.embed.weight.shape[1]))
        return logit + (e * x).sum(dim=1) / math.sqrt(x.shape[1])


class ProGANDiscriminator(_Staged):
    """image (B, 1, s, s) at the current stage resolution s -> logits (B,).

    Args:
        resolution: target side, a power of two from 8 to 1024.
        fmap_base, fmap_max: as for the generator.
        nc: image channels.
        mbstd_group: minibatch-stddev group size (paper: 4).
        dp_compatible: leave out minibatch-stddev (see the module docstring).
        c_dim: length of the label vector (0: unconditional).
    """

    def __init__(
        self, resolution: int = 256, fmap_base: int = 4096, fmap_max: int = 256, nc: int = 1, mbstd_group: int = 4,
        dp_compatible: bool = False, c_dim: int = 0,
    ):
        super().__init__()
        self.resolution, self.dp_compatible, self.c_dim = resolution, dp_compatible, c_dim
        res = _check(resolution)
        ch = {r: channels(r, fmap_base, fmap_max) for r in res}
        self.from_rgb = nn.ModuleDict({str(r): EqualizedConv2d(nc, ch[r], 1, gain=SQRT2) for r in res})
        self.blocks = nn.ModuleDict({str(r): _DBlock(ch[r], ch[r // 2]) for r in res[1:]})
        self.output = _DOutput(ch[4], mbstd=not dp_compatible, mbstd_group=mbstd_group, c_dim=c_dim)
        self._init_stage()

    def _stage_modules(self, stage: int) -> list[nn.Module]:
        used = [self.blocks[str(r)] for r in _octaves(stage)[1:]] + [self.from_rgb[str(stage)], self.output]
        return used + ([self.from_rgb[str(stage // 2)]] if stage > 4 else [])

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        stage = self.stage_resolution
        if x.shape[-1] != stage or x.shape[-2] != stage:
            raise ValueError(f"ProGAN D at stage {stage} px got images of {tuple(x.shape[-2:])}")
        h = lrelu(self.from_rgb[str(stage)](x))
        if stage > 4:
            h = self.blocks[str(stage)](h)
            old = lrelu(self.from_rgb[str(stage // 2)](F.avg_pool2d(x, 2)))
            h = torch.lerp(old, h, self.stage_alpha.to(h.dtype))
            r = stage // 2
            while r > 4:
                h = self.blocks[str(r)](h)
                r //= 2
        return self.output(h, c)
