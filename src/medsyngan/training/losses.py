"""Adversarial losses and regularizers of the GAN step.

Every discriminator term that touches a real image is returned **per sample** (shape (B,)), never reduced: a
DP-SGD update clips each sample's gradient, so it must be able to take the gradient of one sample's loss alone.
Terms on generated images are not private and may be reduced however is convenient.

Conventions (logits ``l`` of D, larger = "real"):

==================  ===================  ===================  ==================
loss                D on real            D on fake            G
==================  ===================  ===================  ==================
nonsaturating       softplus(-l)         softplus(l)          softplus(-l)
wgan-gp             -l + drift·l²        l                    -l
hinge               relu(1 - l)          relu(1 + l)          -l
==================  ===================  ===================  ==================

``softplus(-l)`` is exactly ``BCE(sigmoid(l), 1)``, so the nonsaturating loss is the textbook DCGAN's BCE loss in a
numerically stable form. The WGAN-GP gradient penalty and R1 are separate functions because they need input
gradients (a double backward).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSSES = ("nonsaturating", "wgan-gp", "hinge")


def d_real_terms(loss: str, logits: Tensor, drift: float = 0.0) -> Tensor:
    """Per-sample discriminator loss on real images, (B,)."""
    if loss == "nonsaturating":
        return F.softplus(-logits)
    if loss == "wgan-gp":
        # ProGAN's drift term keeps real scores near zero, so the critic cannot drift off while G catches up.
        return -logits + drift * logits.square()
    if loss == "hinge":
        return F.relu(1.0 - logits)
    raise ValueError(f"unknown loss {loss!r}")


def d_fake_terms(loss: str, logits: Tensor) -> Tensor:
    """Per-sample discriminator loss on generated images, (B,)."""
    if loss == "nonsaturating":
        return F.softplus(logits)
    if loss == "wgan-gp":
        return logits
    if loss == "hinge":
        return F.relu(1.0 + logits)
    raise ValueError(f"unknown loss {loss!r}")


def g_terms(loss: str, logits: Tensor) -> Tensor:
    """Per-sample generator loss, (B,)."""
    if loss == "nonsaturating":
        return F.softplus(-logits)
    if loss in ("wgan-gp", "hinge"):
        return -logits
    raise ValueError(f"unknown loss {loss!r}")


def gradient_penalty(D: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, eps: Tensor) -> Tensor:
    """WGAN-GP (Gulrajani et al. 2017): (‖∇D(x̂)‖ - 1)² at x̂ = real + eps·(fake - real), per sample, (B,).

    Sample i depends only on real[i] and fake[i], so the term stays per-sample for DP.
    """
    # Under autocast G's output may be bf16 while reals are float32; interpolate in float32.
    mixed = torch.lerp(real.detach().float(), fake.detach().float(), eps.view(-1, 1, 1, 1)).requires_grad_(True)
    (grad,) = torch.autograd.grad(D(mixed).float().sum(), mixed, create_graph=True)
    return (grad.float().flatten(1).norm(dim=1) - 1.0).square()


def r1_penalty(D: Callable[[Tensor], Tensor], real: Tensor) -> Tensor:
    """R1 (Mescheder et al. 2018): ‖∇ₓD(x)‖² on real images, per sample, (B,). Callers scale it by γ/2."""
    real = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(D(real).float().sum(), real, create_graph=True)
    return grad.float().square().flatten(1).sum(dim=1)


def lazy_adam_factor(interval: int) -> float:
    """StyleGAN2's correction for a regularizer evaluated every ``interval`` steps as an extra optimizer step.

    Over ``interval`` minibatches the optimizer now takes ``interval + 1`` steps; scaling the learning rate by
    c = interval / (interval + 1) and raising the betas to the power c keeps the per-minibatch dynamics.
    """
    return interval / (interval + 1)


class PathLengthRegularizer(nn.Module):
    """StyleGAN2 path-length regularization with the running mean ``pl_mean`` as a buffer (checkpointed).

    penalty = (‖J_wᵀ y‖ - a)², y ~ N(0, I)/sqrt(H·W), a the EMA (decay 0.01) of the path lengths.
    """

    def __init__(self, decay: float = 0.01):
        super().__init__()
        self.decay = decay
        self.register_buffer("pl_mean", torch.zeros([]))

    def forward(self, images: Tensor, ws: Tensor, noise: Tensor) -> Tensor:
        noise = noise / math.sqrt(images.shape[2] * images.shape[3])
        (grad,) = torch.autograd.grad((images.float() * noise).sum(), ws, create_graph=True)
        lengths = grad.float().square().sum(2).mean(1).sqrt()
        pl_mean = self.pl_mean.lerp(lengths.mean().detach(), self.decay)
        self.pl_mean.copy_(pl_mean)
        return (lengths - pl_mean).square()


def ema_beta(batch_size: int, ema_kimg: float, images_seen: int, rampup: float = 0.0) -> float:
    """Per-step decay of the generator EMA whose half-life is ``ema_kimg`` thousand images.

    With ``rampup`` > 0 the half-life is at most ``rampup`` × images seen so far (StyleGAN2-ADA), so the EMA does
    not drag the random initialization along for most of a short run.
    """
    half_life = ema_kimg * 1000.0
    if rampup > 0:
        half_life = min(half_life, images_seen * rampup)
    if half_life <= 0:
        return 0.0
    return 0.5 ** (batch_size / half_life)
