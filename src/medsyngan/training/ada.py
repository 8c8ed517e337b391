"""Discriminator augmentation for small hospital datasets: ADA (Karras et al. 2020) and DiffAugment (Zhao et al. 2020).

How other code uses it
----------------------
::

    pipe = AugmentPipe()                              # the 'bgc' set for greyscale films; p = 0 is the identity
    ada = AdaptiveP(target=0.6, interval=4, ada_kimg=500)
    pipe.p = ada.p                                    # before every D or G step
    real_logits = D(pipe(real, generator=gen))        # every image that reaches D, real and generated alike
    fake_logits = D(pipe(fake, generator=gen))        # differentiable: G's gradient flows through the pipe
    ada.observe(real_logits)                          # every `interval` batches p moves by ±images / (ada_kimg·1000)
    # or, from sums the caller aggregated or noised itself: ada.accumulate(sign_sum, count)

    DiffAugment(p=1.0)                                # the simpler option: fixed p, same call

Contract shared by both pipes
-----------------------------
- **Per sample.** Each image draws its own transforms: ``draw(n, generator)`` returns a fixed number of uniforms per
  image, and ``apply(images, draws)`` transforms image i from ``images[i]`` and ``draws[i]`` alone — no batch
  statistic, no padding sized by the batch. The output of image i is the same in any batch, which DP-SGD needs: a
  real image's loss, hence its clipped gradient, must depend on that image only.
- **Data-independent randomness.** The number of random numbers drawn depends on the batch size only (not on p, on
  the flags or on the images), so a resumed run replays the same augmentations and raising p only adds transforms
  to the images that had them drawn at a lower p.
- **Differentiable** in the images, twice (R1 and WGAN-GP take input gradients through D ∘ pipe).
- **Greyscale.** Every channel gets the same transform. Of the paper's colour transforms only brightness and
  contrast remain: hue and saturation are the identity on one channel, and luma flip reduces to negating the image
  (a photographic negative of the film), which is not a variation of chest anatomy; all three are left out.

Geometry in one low-pass resampling
-----------------------------------
All geometric transforms of an image compose into one affine map that is applied once: the image is upsampled 2x
with a Lanczos-3 interpolator after symmetric padding, sampled bilinearly at 2x the output resolution with
reflection beyond the border, low-passed with the same Lanczos kernel and decimated. Interpolating and sampling at
twice the rate keeps bilinear sampling from folding high frequencies into low ones (the aliasing a discriminator
would learn to spot, and G to reproduce). The symmetric extension makes the border content-continuous, so no black
frame appears and a constant image stays exactly constant. An image whose composed map is the identity skips the
resampling and is returned unchanged.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RADIUS = 3  # Lanczos support in source pixels: 4·RADIUS taps per 2x stage.

# One column of uniforms per random choice; a "?" column decides whether the transform is applied (u < p).
_BGC = ("xflip?", "xflip", "xint?", "xint_x", "xint_y", "scale?", "scale", "rotate_pre?", "rotate_pre",
        "aniso?", "aniso", "rotate_post?", "rotate_post", "xfrac?", "xfrac_x", "xfrac_y",
        "brightness?", "brightness", "contrast?", "contrast")
_DIFF = ("color?", "brightness", "contrast", "translation?", "shift_x", "shift_y", "cutout?", "center_x", "center_y")


def _lanczos_taps() -> Tensor:
    """The 2x Lanczos kernel sampled at the half-pixel offsets ±0.25, ±0.75, … (source pixels), summing to 1."""
    offsets = (torch.arange(4 * RADIUS, dtype=torch.float64) - (4 * RADIUS - 1) / 2) / 2
    taps = torch.sinc(offsets) * torch.sinc(offsets / RADIUS)
    return (taps / taps.sum()).float()


def _pad_symmetric(x: Tensor, pad: int) -> Tensor:
    """Mirror ``pad`` columns about each edge of the last axis (edge pixels repeated, as grid_sample's reflection)."""
    if x.shape[-1] < pad:
        raise ValueError(f"images must be at least {pad} pixels wide for the resampling filter")
    return torch.cat([x[..., :pad].flip(-1), x, x[..., -pad:].flip(-1)], dim=-1)


def _upsample_last(x: Tensor, taps: Tensor) -> Tensor:
    """(N, 1, H, W) → (N, 1, H, 2W): sample j at source position j/2 − 1/4 (the align_corners=False 2x grid)."""
    width = x.shape[-1]
    # Each of the two polyphase components sums to 1, so constants pass exactly.
    y = F.conv_transpose2d(_pad_symmetric(x, RADIUS), (2 * taps).view(1, 1, 1, -1), stride=(1, 2))
    start = 4 * RADIUS - 1
    return y[..., start:start + 2 * width]


def _sampling_grid(inverse: Tensor, height: int, width: int) -> Tensor:
    """Normalized source coordinates for the 2x output grid with the margin the decimation filter reads.

    ``inverse`` (N, 2, 3) maps output to source positions in pixels, origin at the image centre. The output grid
    runs over 2x positions j/2 − 1/4 for j in [−(2R−1), 2·side + 2R − 2], so decimating with 4R taps gives exactly
    ``side`` pixels. With align_corners=False a centred position c normalizes to 2c / side at any resolution.
    """
    def axis(side: int) -> Tensor:
        j = torch.arange(-(2 * RADIUS - 1), 2 * side + 2 * RADIUS - 1, device=inverse.device, dtype=inverse.dtype)
        return j / 2 - 0.25 - (side - 1) / 2

    yo, xo = torch.meshgrid(axis(height), axis(width), indexing="ij")
    points = torch.stack([xo, yo, torch.ones_like(xo)], dim=-1).view(1, -1, 3)
    scale = torch.tensor([2 / width, 2 / height], device=inverse.device, dtype=inverse.dtype)
    return ((points @ inverse.transpose(1, 2)) * scale).view(-1, *xo.shape, 2)


@functools.lru_cache(maxsize=32)
def _axis_operators(side: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """One axis's 2x interpolation (2·side, side) and decimation (side, 2·side + 4R − 2) as matrices.

    Built by filtering unit impulses, so they are the padded filters exactly; as dense matrices they run as batched
    matrix products, about twice as fast on CPU as one-channel convolutions.
    """
    # Cached for the process: ordinary tensors even when first built under inference mode, or autograd refuses them.
    with torch.inference_mode(False), torch.no_grad():
        taps = _lanczos_taps().to(device, dtype)
        up = _upsample_last(torch.eye(side, device=device, dtype=dtype).view(1, 1, side, side), taps)[0, 0].T
        span = 2 * side + 4 * RADIUS - 2
        impulses = torch.eye(span, device=device, dtype=dtype).view(1, 1, span, span)
        down = F.conv2d(impulses, taps.view(1, 1, 1, -1), stride=(1, 2))[0, 0].T
        return up.contiguous(), down.contiguous()


def resample(images: Tensor, inverse: Tensor) -> Tensor:
    """Apply one affine map per image with the low-pass 2x scheme of the module docstring.

    Args:
        images: (N, C, H, W) float.
        inverse: (N, 2, 3) or (N, 3, 3): output → source position in pixels, origin at the image centre
            (a shift of the content by +t pixels has translation column −t).
    """
    _, _, h, w = images.shape
    up_h, down_h = _axis_operators(h, images.device, images.dtype)
    up_w, down_w = _axis_operators(w, images.device, images.dtype)
    with _no_autocast(images):
        x = _both_axes(images, up_h, up_w)
        grid = _sampling_grid(inverse[:, :2, :].to(images.dtype), h, w)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return _both_axes(x, down_h, down_w)


def _both_axes(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """rows @ x @ colsᵀ per image, as two products that each fold every image into one matrix multiply."""
    x = x @ cols.T
    return (x.transpose(-1, -2) @ rows.T).transpose(-1, -2)


def _no_autocast(images: Tensor):
    """A caller's autocast would run the matrix products in bf16: 8 mantissa bits blur the filters' stopband."""
    return torch.autocast(images.device.type, enabled=False)


def _working_precision(images: Tensor) -> Tensor:
    """float32 at least: bf16 outputs of an autocast G are resampled in float32 and cast back."""
    return images.to(torch.promote_types(images.dtype, torch.float32))


def _normal(u: Tensor) -> Tensor:
    """Standard normal deviates from uniforms (inverse CDF), so one uniform column serves any distribution."""
    return math.sqrt(2.0) * torch.erfinv(2 * u.clamp(1e-7, 1 - 1e-7) - 1)


def _matrices(rows: list[list[Tensor | float]], like: Tensor) -> Tensor:
    """(N, 3, 3) from a 3x3 pattern of per-sample (N,) tensors and constants."""
    cols = [torch.as_tensor(v, dtype=like.dtype, device=like.device).expand_as(like) for row in rows for v in row]
    return torch.stack(cols, dim=-1).view(-1, 3, 3)


def _scale(sx: Tensor | float, sy: Tensor | float, like: Tensor) -> Tensor:
    return _matrices([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]], like)


def _translate(tx: Tensor, ty: Tensor) -> Tensor:
    return _matrices([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]], tx)


def _rotate(theta: Tensor) -> Tensor:
    cos, sin = torch.cos(theta), torch.sin(theta)
    return _matrices([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]], theta)


class _PerSampleAugment(nn.Module):
    """The shared contract (module docstring): ``draw`` the uniforms, ``apply`` them, ``forward`` does both."""

    columns: tuple[str, ...] = ()

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    @property
    def p(self) -> float:
        """Probability with which each enabled transform is applied to each image."""
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"augmentation probability must be in [0, 1], got {value}")
        self._p = float(value)

    def draw(self, n: int, generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> Tensor:
        """(n, len(columns)) uniforms in [0, 1): every random choice for n images, whatever p and the flags."""
        source = generator.device if generator is not None else device
        return torch.rand((n, len(self.columns)), generator=generator, device=source)

    def _col(self, draws: Tensor, name: str) -> Tensor:
        return draws[:, self.columns.index(name)]

    def _chosen(self, draws: Tensor, name: str, enabled: bool, probability: float | None = None) -> Tensor:
        """Which images get transform ``name`` (its '?' column below p, or below ``probability``)."""
        threshold = self.p if probability is None else probability
        return (self._col(draws, name + "?") < threshold) & enabled

    def apply(self, images: Tensor, draws: Tensor) -> Tensor:
        """Transform image i by ``draws[i]`` (see :meth:`draw`); returns images of the input's dtype."""
        with _no_autocast(images):
            return self._apply(_working_precision(images), draws.to(images.device)).to(images.dtype)

    def _apply(self, x: Tensor, draws: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
        return self.apply(images, self.draw(images.shape[0], generator, images.device))


class AugmentPipe(_PerSampleAugment):
    """ADA's 'bgc' pipeline for greyscale chest films (images in [−1, 1]); ranges default to the paper's.

    Geometric, composed and resampled once: horizontal flip (``xflip``, off: the heart is on the left and a
    mirrored chest is another anatomy), integer translation (uniform, ±``xint_max`` of the side, rounded to pixels),
    isotropic scaling (2^N(0, ``scale_std``)), rotation (uniform, ±``rotate_max`` half-turns, applied before and
    after the anisotropic scaling each with probability 1 − √(1 − p), so that some rotation happens with probability
    p), anisotropic scaling (2^N(0, ``aniso_std``) along x, its inverse along y), fractional translation
    (N(0, ``xfrac_std``) of the side). Then brightness (+N(0, ``brightness_std``)) and contrast
    (×2^N(0, ``contrast_std``) about 0, mid-grey).

    Leaking: D sees augmented reals and augmented fakes alike, so G gains nothing by producing rotated or shifted
    films as long as the augmentation is invertible in distribution (ADA §2.2). For a rotation applied with
    probability p that holds when every Fourier coefficient (1 − p) + p·sinc(k·``rotate_max``) of the angle's
    distribution stays non-zero: a full turn (the paper's default, kept) makes them 1 − p, fine for every p < 1; a
    narrower range only for p below about 0.82 (sinc reaches −0.22).
    """

    columns = _BGC

    def __init__(self, p: float = 0.0, *, xflip: bool = False, xint: bool = True, scale: bool = True,
                 rotate: bool = True, aniso: bool = True, xfrac: bool = True, brightness: bool = True,
                 contrast: bool = True, xint_max: float = 0.125, scale_std: float = 0.2, rotate_max: float = 1.0,
                 aniso_std: float = 0.2, xfrac_std: float = 0.125, brightness_std: float = 0.2,
                 contrast_std: float = 0.5):
        super().__init__(p)
        self.xflip, self.xint, self.scale, self.rotate = xflip, xint, scale, rotate
        self.aniso, self.xfrac, self.brightness, self.contrast = aniso, xfrac, brightness, contrast
        ranges = dict(xint_max=xint_max, scale_std=scale_std, rotate_max=rotate_max, aniso_std=aniso_std,
                      xfrac_std=xfrac_std, brightness_std=brightness_std, contrast_std=contrast_std)
        if min(ranges.values()) < 0:
            raise ValueError(f"augmentation ranges must be ≥ 0, got {ranges}")
        self.xint_max, self.scale_std, self.rotate_max, self.aniso_std = xint_max, scale_std, rotate_max, aniso_std
        self.xfrac_std, self.brightness_std, self.contrast_std = xfrac_std, brightness_std, contrast_std

    def inverse_matrices(self, draws: Tensor, height: int, width: int) -> Tensor:
        """(N, 3, 3) output → source maps in centred pixels; the content moves by flip, then shift, …, then xfrac."""
        u = lambda name: self._col(draws, name)  # noqa: E731
        zero = torch.zeros_like(u("xflip"))
        flip = torch.where(self._chosen(draws, "xflip", self.xflip) & (u("xflip") < 0.5), -1.0, 1.0)
        inv = _scale(flip, 1.0, zero)
        shift = self._chosen(draws, "xint", self.xint)
        tx = torch.where(shift, torch.round((2 * u("xint_x") - 1) * self.xint_max * width), zero)
        ty = torch.where(shift, torch.round((2 * u("xint_y") - 1) * self.xint_max * height), zero)
        inv = inv @ _translate(-tx, -ty)
        s = torch.where(self._chosen(draws, "scale", self.scale), torch.exp2(_normal(u("scale")) * self.scale_std), 1.0)
        inv = inv @ _scale(1 / s, 1 / s, zero)
        p_rot = 1 - math.sqrt(1 - self.p)
        angles = {}
        for name in ("rotate_pre", "rotate_post"):
            turn = (2 * u(name) - 1) * math.pi * self.rotate_max
            angles[name] = torch.where(self._chosen(draws, name, self.rotate, p_rot), turn, zero)
        a = torch.where(self._chosen(draws, "aniso", self.aniso), torch.exp2(_normal(u("aniso")) * self.aniso_std), 1.0)
        inv = inv @ _rotate(-angles["rotate_pre"]) @ _scale(1 / a, a, zero) @ _rotate(-angles["rotate_post"])
        frac = self._chosen(draws, "xfrac", self.xfrac)
        fx = torch.where(frac, _normal(u("xfrac_x")) * self.xfrac_std * width, zero)
        fy = torch.where(frac, _normal(u("xfrac_y")) * self.xfrac_std * height, zero)
        return inv @ _translate(-fx, -fy)

    def _apply(self, x: Tensor, draws: Tensor) -> Tensor:
        n, _, h, w = x.shape
        draws = draws.to(x.dtype)
        inverse = self.inverse_matrices(draws, h, w)
        moved = (inverse != torch.eye(3, device=x.device, dtype=x.dtype)).flatten(1).any(1)
        if bool(moved.any()):
            idx = moved.nonzero().squeeze(1)
            # x[idx], not index_select: the latter's backward (index_add) is 30x slower on CPU here.
            x = x.index_copy(0, idx, resample(x[idx], inverse[idx]))
        b = torch.where(self._chosen(draws, "brightness", self.brightness),
                        _normal(self._col(draws, "brightness")) * self.brightness_std, 0.0)
        c = torch.where(self._chosen(draws, "contrast", self.contrast),
                        torch.exp2(_normal(self._col(draws, "contrast")) * self.contrast_std), 1.0)
        return (x + b.view(n, 1, 1, 1)) * c.view(n, 1, 1, 1)


class DiffAugment(_PerSampleAugment):
    """DiffAugment's 'color,translation,cutout' policy for greyscale films, each part applied with a fixed p.

    Colour: brightness +U(−0.5, 0.5), then contrast ×U(0.5, 1.5) about the image's own mean (saturation, the third
    colour op of the paper, is the identity on one channel). Translation: a whole-pixel shift of up to
    ``translation_ratio`` of the side, filled with 0. Cutout: a square of ``cutout_ratio`` of the side set to 0,
    centred on a uniform pixel and clipped at the border. The paper applies all three always (p = 1).
    """

    columns = _DIFF

    def __init__(self, p: float = 1.0, *, color: bool = True, translation: bool = True, cutout: bool = True,
                 translation_ratio: float = 0.125, cutout_ratio: float = 0.5):
        super().__init__(p)
        if not (0 <= translation_ratio <= 1 and 0 <= cutout_ratio <= 1):
            raise ValueError("translation_ratio and cutout_ratio must be in [0, 1]")
        self.color, self.translation, self.cutout = color, translation, cutout
        self.translation_ratio, self.cutout_ratio = translation_ratio, cutout_ratio

    def _apply(self, x: Tensor, draws: Tensor) -> Tensor:
        n, c, h, w = x.shape
        draws = draws.to(x.dtype)
        u = lambda name: self._col(draws, name)  # noqa: E731
        per_image = lambda t: t.view(n, 1, 1, 1)  # noqa: E731

        recolor = per_image(self._chosen(draws, "color", self.color))
        bright = x + per_image(u("brightness") - 0.5)
        mean = bright.mean(dim=(1, 2, 3), keepdim=True)
        x = torch.where(recolor, (bright - mean) * per_image(u("contrast") + 0.5) + mean, x)

        move = self._chosen(draws, "translation", self.translation)
        rows = torch.arange(h, device=x.device).expand(n, h)
        cols = torch.arange(w, device=x.device).expand(n, w)
        src_rows = rows - torch.where(move, self._shift(u("shift_y"), h), 0).unsqueeze(1)
        src_cols = cols - torch.where(move, self._shift(u("shift_x"), w), 0).unsqueeze(1)
        x = x.gather(2, src_rows.clamp(0, h - 1).view(n, 1, h, 1).expand(n, c, h, w))
        x = x.gather(3, src_cols.clamp(0, w - 1).view(n, 1, 1, w).expand(n, c, h, w))
        rows_in = ((src_rows >= 0) & (src_rows < h)).view(n, 1, h, 1)
        x = x * (rows_in & ((src_cols >= 0) & (src_cols < w)).view(n, 1, 1, w))

        cut = self._chosen(draws, "cutout", self.cutout)
        side_h, side_w = int(h * self.cutout_ratio + 0.5), int(w * self.cutout_ratio + 0.5)
        top = (u("center_y") * h).long() - side_h // 2
        left = (u("center_x") * w).long() - side_w // 2
        in_rows = (rows >= top.unsqueeze(1)) & (rows < (top + side_h).unsqueeze(1))
        in_cols = (cols >= left.unsqueeze(1)) & (cols < (left + side_w).unsqueeze(1))
        hole = in_rows.view(n, 1, h, 1) & in_cols.view(n, 1, 1, w) & per_image(cut)
        return x.masked_fill(hole, 0.0)

    def _shift(self, u: Tensor, side: int) -> Tensor:
        """Whole-pixel shift, uniform over [−m, m] with m = round(ratio · side)."""
        m = int(side * self.translation_ratio + 0.5)
        return (u * (2 * m + 1)).long().clamp(max=2 * m) - m


class AdaptiveP:
    """ADA's overfitting heuristic: r_t = E[sign(D(real))] over ``interval`` batches moves p towards ``target``.

    After every ``interval`` batches, p += sign(r_t − target) · images / (``ada_kimg`` · 1000), clamped to
    [0, ``p_max``]: p can cross [0, 1] in ``ada_kimg`` thousand images. ``images`` is the count accumulated over the
    interval (batch × interval for fixed batches). ``p_max`` < 1 because at p = 1 no image is left unaugmented and
    the transforms leak into G. State (p and the partial interval) round-trips through plain floats (JSON).
    """

    def __init__(self, target: float = 0.6, interval: int = 4, ada_kimg: float = 500.0, p: float = 0.0,
                 p_max: float = 0.99):
        if not -1.0 < target < 1.0:
            raise ValueError(f"ADA target must be in (−1, 1), got {target}")
        if interval < 1 or ada_kimg <= 0:
            raise ValueError("ADA interval must be ≥ 1 batch and ada_kimg > 0")
        if not 0.0 < p_max < 1.0 or not 0.0 <= p <= p_max:
            raise ValueError(f"need 0 ≤ p ≤ p_max < 1, got p={p}, p_max={p_max}")
        self.target, self.interval, self.ada_kimg, self.p_max = target, interval, ada_kimg, p_max
        self.p = float(p)
        self.r_t: float | None = None  # the last interval's statistic (for logs)
        self._sign_sum, self._count, self._batches = 0.0, 0.0, 0

    def observe(self, real_logits: Tensor) -> float:
        """Account one batch of D's logits on (augmented) real images; returns p."""
        logits = real_logits.detach()
        return self.accumulate(float(logits.sign().sum()), logits.numel())

    def accumulate(self, sign_sum: float, count: float) -> float:
        """Account one batch given Σ sign(D(real)) and its image count (aggregated or DP-noised); returns p."""
        self._sign_sum += float(sign_sum)
        self._count += float(count)
        self._batches += 1
        if self._batches >= self.interval:
            if self._count > 0:
                self.r_t = self._sign_sum / self._count
                direction = (self.r_t > self.target) - (self.r_t < self.target)
                self.p = min(max(self.p + direction * self._count / (self.ada_kimg * 1000), 0.0), self.p_max)
            self._sign_sum, self._count, self._batches = 0.0, 0.0, 0
        return self.p

    def state_dict(self) -> dict[str, float | int | None]:
        return {"p": self.p, "r_t": self.r_t, "sign_sum": self._sign_sum, "count": self._count,
                "batches": self._batches}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.state_dict()):
            raise KeyError(f"ADA state needs keys {sorted(self.state_dict())}, got {sorted(state)}")
        if not 0.0 <= float(state["p"]) <= self.p_max:
            raise ValueError(f"ADA state p={state['p']} outside [0, {self.p_max}]")
        self.p = float(state["p"])
        self.r_t = None if state["r_t"] is None else float(state["r_t"])
        self._sign_sum, self._count = float(state["sign_sum"]), float(state["count"])
        self._batches = int(state["batches"])
