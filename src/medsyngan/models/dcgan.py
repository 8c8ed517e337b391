"""DCGAN (Radford et al. 2016), greyscale.

At 64 px with ``nc=1`` the networks are, parameter for parameter, those of ``pytorch/examples/dcgan``: a
``ConvTranspose2d`` stack with BatchNorm and ReLU in G ending in Tanh, a strided ``Conv2d`` stack with LeakyReLU(0.2)
and BatchNorm (none after the first layer) in D, no biases, weights N(0, 0.02) and BatchNorm scales N(1, 0.02). The
only difference is that D returns logits of shape (B,) rather than sigmoid probabilities, so that the trainer can use
a numerically stable BCE-with-logits (or any other loss).

Other resolutions (32–256 px) add or remove one stride-2 block per octave. Widths double towards the 4x4 end as in
the textbook network, capped at ``max_mult`` times ``ngf``/``ndf`` so that 128 and 256 px stay affordable.

DP-compatible discriminator (``dp_compatible=True``): every BatchNorm becomes a GroupNorm (statistics per sample,
so no sample influences another's output, which per-sample gradients and DP-SGD need) and activations are not
in-place (Opacus' backward hooks need each layer's input intact). The parameter count is unchanged.

Class-conditional networks (``c_dim > 0``, a label vector of :mod:`medsyngan.data.labels`): G concatenates a linear
embedding of the labels (``LABEL_EMBED`` features) to z; D is a projection discriminator (Miyato & Koyama 2018):
logit = ψ(φ(x)) + ⟨E c, mean_positions φ(x)⟩, with φ(x) the features before the last convolution ψ and E
initialised like every DCGAN weight, N(0, 0.02). (Miyato & Koyama sum over positions under spectral
normalisation; without it the sum makes the projection outweigh ψ sixteen-fold at the start, and D wins at once.)
A multi-hot vector projects onto the sum of its labels' embeddings. Everything stays per sample. With ``c_dim = 0`` the
networks are exactly the unconditional ones (no extra parameter is created, so seeded weights do not move).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medsyngan.models.layers import label_batch

SUPPORTED_RESOLUTIONS = (32, 64, 128, 256)
LABEL_EMBED = 32  # at least the 22 components of the largest label vector, so no label combination is lost


def _octaves(resolution: int) -> int:
    """Stride-2 layers between 4x4 and the image, not counting the one that produces the image itself."""
    if resolution not in SUPPORTED_RESOLUTIONS:
        raise ValueError(f"DCGAN resolution {resolution} not in {SUPPORTED_RESOLUTIONS}")
    return int(math.log2(resolution)) - 3


def _init_weights(module: nn.Module) -> None:
    # The textbook initialisation (pytorch/examples weights_init), applied to GroupNorm as to BatchNorm.
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DCGANGenerator(nn.Module):
    """z (B, z_dim) or (B, z_dim, 1, 1) -> image (B, nc, R, R) in [-1, 1].

    Args:
        resolution: output side, one of 32, 64, 128, 256.
        z_dim: latent dimension (textbook ``nz`` = 100).
        ngf: feature maps of the last hidden layer (textbook 64); earlier layers double it per octave.
        nc: image channels (1: greyscale).
        max_mult: cap on the width multiplier of ``ngf`` (the textbook 64-px network reaches exactly 8).
        c_dim: length of the label vector (0: unconditional).
    """

    def __init__(self, resolution: int = 64, z_dim: int = 100, ngf: int = 64, nc: int = 1, max_mult: int = 8,
                 c_dim: int = 0):
        super().__init__()
        self.resolution, self.z_dim, self.c_dim = resolution, z_dim, c_dim
        n = _octaves(resolution)
        widths = [ngf * min(2 ** (n - i), max_mult) for i in range(n + 1)]
        embed = LABEL_EMBED if c_dim else 0
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(z_dim + embed, widths[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(True),
        ]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)
        if c_dim:
            self.embed = nn.Linear(c_dim, embed, bias=False)
            nn.init.normal_(self.embed.weight)  # embedded labels on the scale of z

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        z = z.reshape(z.shape[0], -1)
        if self.c_dim:
            z = torch.cat([z, self.embed(label_batch(c, z, self.c_dim))], dim=1)
        return self.main(z.reshape(z.shape[0], -1, 1, 1))


class DCGANDiscriminator(nn.Module):
    """image (B, nc, R, R) -> logits (B,).

    Args:
        resolution: input side, one of 32, 64, 128, 256.
        ndf: feature maps of the first layer (textbook 64); later layers double it per octave.
        nc: image channels (1: greyscale).
        max_mult: cap on the width multiplier of ``ndf``.
        dp_compatible: GroupNorm instead of BatchNorm and no in-place activations (see the module docstring).
        c_dim: length of the label vector (0: unconditional).
    """

    def __init__(
        self, resolution: int = 64, ndf: int = 64, nc: int = 1, max_mult: int = 8, dp_compatible: bool = False,
        c_dim: int = 0,
    ):
        super().__init__()
        self.resolution, self.dp_compatible, self.c_dim = resolution, dp_compatible, c_dim
        n = _octaves(resolution)
        widths = [ndf * min(2**i, max_mult) for i in range(n + 1)]
        inplace = not dp_compatible
        layers: list[nn.Module] = [nn.Conv2d(nc, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace)]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            norm = nn.GroupNorm(math.gcd(c_out, 32), c_out) if dp_compatible else nn.BatchNorm2d(c_out)
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), norm, nn.LeakyReLU(0.2, inplace)]
        layers += [nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False)]
        self.main = nn.Sequential(*layers)
        if c_dim:
            self.embed = nn.Linear(c_dim, widths[-1], bias=False)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if not self.c_dim:
            return self.main(x).reshape(-1)
        features = self.main[:-1](x)
        projection = (self.embed(label_batch(c, x, self.c_dim)) * features.mean(dim=(2, 3))).sum(dim=1)
        return self.main[-1](features).reshape(-1) + projection

