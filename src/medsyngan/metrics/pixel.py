"""SSIM, PSNR and MSE for unpaired generation, and MS-SSIM diversity.

Synthetic images have no ground truth, so pixel metrics are defined against the nearest real image:

- **nearest-neighbour (NN) search** — for each synthetic image, the training image of highest SSIM (reported:
  its SSIM) and the training image of lowest MSE (reported: that MSE and its PSNR). High NN-SSIM / low NN-MSE
  means a synthetic image sits close to one training image: a memorization signal, not a quality score.
- **MS-SSIM diversity** — mean MS-SSIM over random pairs of distinct images of one set. Compared between the
  synthetic and the real set: a synthetic value well above the real one means mode collapse.

SSIM follows scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)``: an 11-tap Gaussian window (σ = 1.5, truncated at 3.5 σ),
K1 = 0.01, K2 = 0.03, the map averaged over the pixels whose window lies inside the image. Images are
float in [0, 1]. The window is separable, so filtering is two small matrix products, which lets the NN search
score every (synthetic, training) pair of a block at once instead of looping over pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from medsyngan.errors import UserError
from medsyngan.rundir import progress

SIGMA = 1.5
RADIUS = int(3.5 * SIGMA + 0.5)  # scipy.ndimage.gaussian_filter's radius for truncate = 3.5
WIN = 2 * RADIUS + 1
K1, K2 = 0.01, 0.03
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def to_unit(images_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = images_u8 if isinstance(images_u8, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images_u8))
    return t.float() / 255.0


def _band(size: int, dtype=torch.float32) -> torch.Tensor:
    """[size, size - 2·RADIUS] matrix whose columns are the Gaussian window at each valid position."""
    x = torch.arange(WIN, dtype=torch.float64) - RADIUS
    g = torch.exp(-0.5 * (x / SIGMA) ** 2)
    g = g / g.sum()
    out = size - 2 * RADIUS
    band = torch.zeros(size, out, dtype=torch.float64)
    for c in range(out):
        band[c : c + WIN, c] = g
    return band.to(dtype)


class _Filter:
    """Valid Gaussian filtering of [..., H, W] tensors as Wvᵀ · X · Wh."""

    def __init__(self, h: int, w: int, dtype=torch.float32):
        if min(h, w) < WIN:
            raise UserError(f"SSIM needs images of at least {WIN}×{WIN} pixels; got {h}×{w}")
        self.wv, self.wh = _band(h, dtype), _band(w, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.wv.T @ (x @ self.wh)


def _constants(data_range: float) -> tuple[float, float]:
    return (K1 * data_range) ** 2, (K2 * data_range) ** 2


def _ssim_maps(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """SSIM map and contrast-structure map of aligned pairs x[i], y[i] (float [B, H, W])."""
    filt = _Filter(x.shape[-2], x.shape[-1], x.dtype)
    c1, c2 = _constants(data_range)
    mx, my = filt(x), filt(y)
    vx, vy = filt(x * x) - mx * mx, filt(y * y) - my * my
    cov = filt(x * y) - mx * my
    cs = (2 * cov + c2) / (vx + vy + c2)
    return ((2 * mx * my + c1) / (mx * mx + my * my + c1)) * cs, cs


def ssim_pairs(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM of aligned pairs; x, y float [B, H, W]. Returns [B]."""
    return _ssim_maps(x, y, data_range)[0].mean(dim=(-2, -1))


def ms_ssim_scales(size: int) -> int:
    """Scales whose images still hold one full window (3 at 64 px, 5 from 176 px)."""
    return max(1, min(len(MS_SSIM_WEIGHTS), int(math.log2(size / WIN)) + 1))


def ms_ssim_pairs(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """MS-SSIM (Wang et al. 2003) of aligned pairs, with 2×2 average-pool downsampling between scales.

    Below 176 px fewer than five scales fit the 11-px window; the first weights are used and renormalised.
    Negative contrast-structure terms are clipped at 0 before the weighted geometric mean.
    """
    n = ms_ssim_scales(min(x.shape[-2:]))
    w = torch.tensor(MS_SSIM_WEIGHTS[:n], dtype=torch.float64)
    w = w / w.sum()
    out = torch.ones(x.shape[0], dtype=torch.float64)
    for s in range(n):
        ssim_map, cs_map = _ssim_maps(x, y, data_range)
        value = (ssim_map if s == n - 1 else cs_map).mean(dim=(-2, -1)).double().clamp_min(0)
        out = out * value ** w[s]
        if s < n - 1:
            x = torch.nn.functional.avg_pool2d(x[:, None], 2)[:, 0]
            y = torch.nn.functional.avg_pool2d(y[:, None], 2)[:, 0]
    return out


def ms_ssim_diversity(images_u8: np.ndarray, pairs: int = 1000, seed: int = 0, batch: int = 256) -> float:
    """Mean MS-SSIM over ``pairs`` random pairs of distinct images (lower = more diverse)."""
    n = len(images_u8)
    if n < 2:
        raise UserError(f"MS-SSIM diversity needs at least 2 images; got {n}")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, pairs)
    j = (i + rng.integers(1, n, pairs)) % n  # never the image itself
    images = np.asarray(images_u8)
    values = []
    for start in range(0, pairs, batch):
        a, b = to_unit(images[i[start : start + batch]]), to_unit(images[j[start : start + batch]])
        values.append(ms_ssim_pairs(a, b))
    return float(torch.cat(values).mean())


def mse_psnr_pairs(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    mse = ((x.double() - y.double()) ** 2).mean(dim=(-2, -1))
    return mse, psnr_from_mse(mse, data_range)


def psnr_from_mse(mse: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    return 10 * torch.log10(data_range**2 / mse)  # +inf for an exact copy, as scikit-image


@dataclass
class NearestNeighbours:
    """Per synthetic image: the most SSIM-similar training image and the closest training image by MSE."""

    ssim: np.ndarray  # [N] highest SSIM to any training image
    ssim_index: np.ndarray  # [N] that training image
    mse: np.ndarray  # [N] lowest MSE to any training image
    mse_index: np.ndarray  # [N]
    psnr: np.ndarray  # [N] PSNR of that lowest-MSE pair


def nearest_neighbours(
    fake_u8: np.ndarray, train_u8: np.ndarray, pair_block: int = 4096, progress_desc: str | None = None,
    device: torch.device | str = "cpu",
) -> NearestNeighbours:
    """Exhaustive NN search over all (synthetic, training) pairs.

    SSIM: each image's local means and variances are filtered once; per block of pairs only the cross term
    E[xy] is filtered (two matrix products over the whole block). MSE: ‖x‖² + ‖y‖² − 2 xᵀy by one float64
    matrix product.
    """
    if len(fake_u8) == 0 or len(train_u8) == 0:
        raise UserError("nearest-neighbour search needs at least one synthetic and one training image")
    if fake_u8.shape[1:] != train_u8.shape[1:]:
        raise UserError(
            f"synthetic images are {fake_u8.shape[1]}×{fake_u8.shape[2]} but training images are "
            f"{train_u8.shape[1]}×{train_u8.shape[2]}; evaluate at one resolution"
        )
    fake, train = to_unit(fake_u8).to(device), to_unit(train_u8).to(device)
    h, w = fake.shape[-2:]
    filt = _Filter(h, w)
    filt.wv, filt.wh = filt.wv.to(device), filt.wh.to(device)
    c1, c2 = _constants(1.0)
    mu_f, mu_t = filt(fake), filt(train)
    var_f, var_t = filt(fake * fake) - mu_f**2, filt(train * train) - mu_t**2
    # per-image terms of the SSIM denominators, so that each pair costs only its cross terms
    sq_f, sq_t = mu_f**2, mu_t**2 + c1
    var_t = var_t + c2

    n_f, n_t = len(fake), len(train)
    block_t = max(1, min(n_t, pair_block))
    block_f = max(1, pair_block // block_t)
    best = torch.full((n_f,), -2.0, device=device)
    best_idx = torch.zeros(n_f, dtype=torch.long, device=device)
    with progress() as bar:
        task = bar.add_task(progress_desc or "nearest-neighbour SSIM", total=n_f)
        for fs in range(0, n_f, block_f):
            sl = slice(fs, fs + block_f)
            f, mf, vf, qf = fake[sl, None], mu_f[sl, None], var_f[sl, None], sq_f[sl, None]
            for ts in range(0, n_t, block_t):
                tl = slice(ts, ts + block_t)
                t, mt, vt, qt = train[None, tl], mu_t[None, tl], var_t[None, tl], sq_t[None, tl]
                # (2·μf·μt + C1)(2·cov + C2) / ((μf² + μt² + C1)(σf² + σt² + C2)), in place: the block's
                # temporaries are the memory traffic that bounds this loop
                cross = filt(f * t)
                means = mf * mt
                num = torch.add(means, c1 / 2).mul_(2)
                num.mul_(cross.sub_(means).mul_(2).add_(c2))
                den = torch.add(qf, qt).mul_(torch.add(vf, vt))
                score = num.div_(den).mean(dim=(-2, -1))  # [block_f, block_t]
                value, idx = score.max(dim=1)
                better = value > best[fs : fs + block_f]
                best[fs : fs + block_f] = torch.where(better, value, best[fs : fs + block_f])
                best_idx[fs : fs + block_f] = torch.where(better, idx + ts, best_idx[fs : fs + block_f])
            bar.advance(task, len(f))

    ff = fake.reshape(n_f, -1).double()
    tt = train.reshape(n_t, -1).double()
    d2 = (ff * ff).sum(1, keepdim=True) + (tt * tt).sum(1)[None] - 2 * ff @ tt.T
    mse, mse_idx = (d2.clamp_min(0) / ff.shape[1]).min(dim=1)
    mse, mse_idx = mse.cpu(), mse_idx.cpu()
    return NearestNeighbours(
        ssim=best.cpu().numpy().astype(np.float64), ssim_index=best_idx.cpu().numpy(), mse=mse.numpy(),
        mse_index=mse_idx.numpy(), psnr=psnr_from_mse(mse).numpy(),
    )
