"""Perceptual path length (Karras et al. 2019).

PPL = E[ d(G(l(t)), G(l(t + ε))) / ε² ] with ε = 1e-4, the mean taken after discarding distances below the
1st and above the 99th percentile. Latent paths:

- ``wend`` (StyleGAN2, which has ``G.mapping`` and ``G.synthesis``): linear interpolation in W between the
  mappings of two random z, at the path's end point t = 0 (StyleGAN2's reported "PPL_W, end").
- ``zfull`` (DCGAN, ProGAN): spherical interpolation between two random z at t ~ U(0, 1). Those generators
  were trained on z ~ N(0, I), whose mass lies near the sphere of radius √dim, so the slerp runs on that
  sphere rather than the unit one.

d is LPIPS-VGG (greyscale repeated to RGB, in [-1, 1], images above 256 px area-downsampled to 256 as in
StyleGAN). The fallback ``randomfeat`` uses the squared feature distance of the seeded random network per
feature dimension; its values are not comparable with LPIPS-based PPL and the metric name says so.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from medsyngan.errors import UserError

EPSILON = 1e-4
MIN_PPL_SAMPLES = 100

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def path_kind(generator: torch.nn.Module) -> str:
    return "wend" if hasattr(generator, "mapping") and hasattr(generator, "synthesis") else "zfull"


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between the directions of a and b, returned on the unit sphere."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    d = (a * b).sum(-1, keepdim=True).clamp(-1, 1)
    p = t[:, None] * torch.acos(d)
    c = b - d * a
    c = c / c.norm(dim=-1, keepdim=True)
    out = a * torch.cos(p) + c * torch.sin(p)
    return out / out.norm(dim=-1, keepdim=True)


def lpips_distance(model: torch.nn.Module) -> Distance:
    def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape[-1] > 256:
            a, b = F.adaptive_avg_pool2d(a, 256), F.adaptive_avg_pool2d(b, 256)
        return model(a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1))

    return dist


def random_feature_distance(net: torch.nn.Module, size: int = 64) -> Distance:
    def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape[-1] != size:
            a = F.interpolate(a, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            b = F.interpolate(b, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        fa, fb = net(a), net(b)
        return ((fa - fb) ** 2).mean(dim=1)

    return dist


def _synthesize(generator: torch.nn.Module, w: torch.Tensor) -> torch.Tensor:
    """Both end points must see the same per-pixel noise, or the noise alone would dominate the distance."""
    try:
        return generator.synthesis(w, noise_mode="const")
    except TypeError:  # a synthesis network without noise inputs
        return generator.synthesis(w)


def percentile_filtered_mean(values: np.ndarray) -> float:
    lo = np.percentile(values, 1, method="lower")
    hi = np.percentile(values, 99, method="higher")
    return float(values[(values >= lo) & (values <= hi)].mean())


@torch.no_grad()
def perceptual_path_length(
    generator: torch.nn.Module, distance: Distance, num_samples: int = 10_000, batch_size: int = 64,
    seed: int = 0, device: torch.device | str = "cpu", epsilon: float = EPSILON,
) -> tuple[float, np.ndarray]:
    """Returns (PPL, the unfiltered per-sample distances / ε²)."""
    if num_samples < MIN_PPL_SAMPLES:
        raise UserError(f"PPL needs at least {MIN_PPL_SAMPLES} samples for its 1st–99th percentile filter; got {num_samples}")
    z_dim = getattr(generator, "z_dim", None)
    if z_dim is None:
        raise UserError("PPL needs a generator with a z_dim attribute (the model zoo's generators have one)")
    kind = path_kind(generator)
    generator = generator.eval().to(device)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        z0 = torch.randn(n, z_dim, generator=gen)
        z1 = torch.randn(n, z_dim, generator=gen)
        if kind == "wend":
            w0, w1 = generator.mapping(z0.to(device)), generator.mapping(z1.to(device))
            a = _synthesize(generator, w0)
            b = _synthesize(generator, torch.lerp(w0, w1, epsilon))
        else:
            t = torch.rand(n, generator=gen)
            scale = z_dim**0.5
            a = generator((slerp(z0, z1, t) * scale).to(device))
            b = generator((slerp(z0, z1, t + epsilon) * scale).to(device))
        out.append((distance(a.float(), b.float()) / epsilon**2).double().cpu())
    values = torch.cat(out).numpy()
    return percentile_filtered_mean(values), values
