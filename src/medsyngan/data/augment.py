"""Per-batch geometric augmentation on the training device: horizontal flip, rotation, zoom/translate.

Every random number of a batch is drawn whatever the outcome (a fixed count per image), so the generator's
stream depends only on the batch size and a resumed run replays exactly the same augmentations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medsyngan.config import AugmentSection


def is_active(cfg: AugmentSection | None) -> bool:
    return cfg is not None and (cfg.hflip_p > 0 or cfg.rotate_p > 0 or cfg.zoom_p > 0)


def augment_batch(x: torch.Tensor, cfg: AugmentSection, generator: torch.Generator) -> torch.Tensor:
    """x: (B, C, H, W) float on any device; returns a new tensor of the same shape and device."""
    b = x.shape[0]
    # 7 uniforms per image: flip?, rotate?, angle, zoom?, scale, shift x, shift y
    u = torch.rand((b, 7), generator=generator, device=generator.device).to(device=x.device, dtype=torch.float32)
    flip = u[:, 0] < cfg.hflip_p
    rotate = u[:, 1] < cfg.rotate_p
    zoom = u[:, 3] < cfg.zoom_p
    out = x
    if bool(flip.any()):
        out = torch.where(flip.view(b, 1, 1, 1), out.flip(-1), out)
    if not bool((rotate | zoom).any()):
        return out if out is not x else x.clone()

    angle = torch.where(rotate, (2 * u[:, 2] - 1) * math.radians(cfg.rotate_deg), torch.zeros_like(u[:, 2]))
    scale = torch.where(zoom, 1 + (2 * u[:, 4] - 1) * cfg.zoom_range, torch.ones_like(u[:, 4]))
    # affine_grid works in [-1, 1] coordinates, so a shift of a fraction f of the image is 2f.
    tx = torch.where(zoom, (2 * u[:, 5] - 1) * 2 * cfg.translate, torch.zeros_like(u[:, 5]))
    ty = torch.where(zoom, (2 * u[:, 6] - 1) * 2 * cfg.translate, torch.zeros_like(u[:, 6]))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], dim=1), torch.stack([sin, cos, ty], dim=1)], dim=1
    ).to(out.dtype)
    grid = F.affine_grid(theta, list(out.shape), align_corners=False)
    # 'border' repeats the edge (body/air) instead of painting a black frame a GAN would learn.
    moved = F.grid_sample(out, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.where((rotate | zoom).view(b, 1, 1, 1), moved, out)
