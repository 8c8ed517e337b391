"""PNG figures of the report (matplotlib, Agg backend), returned as bytes so that the HTML can inline them."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from medsyngan.data.imageio import image_grid  # noqa: E402

X_KEYS = ("kimg", "round", "step")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def grid_png(images_u8: np.ndarray, cols: int | None = None, pad: int = 2, min_side: int = 96) -> bytes:
    """A tiled grid of greyscale images, upscaled (nearest) so that 64-px images stay legible in a browser."""
    grid = image_grid(images_u8, cols, pad)
    s = images_u8.shape[-1]
    scale = max(1, math.ceil(min_side / s))
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def nn_panel_png(
    fake_u8: np.ndarray, train_u8: np.ndarray, order: Sequence[int], nn_index: np.ndarray, ssim: np.ndarray,
    threshold: float,
) -> bytes:
    """Top row: the synthetic images closest to a training image; bottom row: that training image."""
    k = len(order)
    fig, axes = plt.subplots(2, k, figsize=(1.5 * k, 3.4), squeeze=False)
    for col, i in enumerate(order):
        flagged = ssim[i] > threshold
        for row, img in enumerate((fake_u8[i], train_u8[nn_index[i]])):
            ax = axes[row][col]
            ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if flagged:
                for side in ax.spines.values():
                    side.set_color("red")
                    side.set_linewidth(3)
        axes[0][col].set_title(f"#{i}\nSSIM {ssim[i]:.3f}", fontsize=8, color="red" if flagged else "black")
        axes[1][col].set_xlabel(f"train #{nn_index[i]}", fontsize=8)
    axes[0][0].set_ylabel("synthetic", fontsize=9)
    axes[1][0].set_ylabel("nearest train", fontsize=9)
    return _png(fig)


def dcr_png(synthetic_to_train: np.ndarray, holdout_to_train: np.ndarray, space: str) -> bytes:
    fig, ax = plt.subplots(figsize=(5, 3))
    hi = float(max(synthetic_to_train.max(), holdout_to_train.max()))
    bins = np.linspace(0, hi * 1.02 if hi > 0 else 1, 40)
    ax.hist(holdout_to_train, bins=bins, alpha=0.6, density=True, label="holdout → train")
    ax.hist(synthetic_to_train, bins=bins, alpha=0.6, density=True, label="synthetic → train")
    ax.set_xlabel(f"distance to nearest training image ({space})")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return _png(fig)


def roc_png(attacks: Sequence[Any], epsilon: float | None, delta: float | None, bound_fn=None) -> bytes:
    """ROC curves of the membership attacks on log axes (the low-FPR regime), with the (ε, δ)-DP bound."""
    fig, ax = plt.subplots(figsize=(4.5, 4))
    grid = np.logspace(-4, 0, 200)
    ax.plot(grid, grid, "k:", lw=1, label="chance")
    for attack in attacks:
        ax.step(np.clip(attack.fpr, 1e-4, 1), np.clip(attack.tpr, 1e-4, 1), where="post",
                label=f"{attack.name} (AUC {attack.auc:.3f})")
    if epsilon is not None and bound_fn is not None:
        ax.plot(grid, np.clip(bound_fn(grid, epsilon, delta or 0.0), 1e-4, 1), "r--", lw=1.2,
                label=f"(ε={epsilon:g}, δ={delta or 0:g})-DP bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_ylim(1e-4, 1.05)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def x_key(rows: Sequence[dict[str, Any]], candidates: Sequence[str] = X_KEYS) -> str | None:
    for key in candidates:
        if any(key in r for r in rows):
            return key
    return None


def curves_png(
    rows: Sequence[dict[str, Any]], keys: Sequence[str], title: str = "", x_keys: Sequence[str] = X_KEYS
) -> bytes | None:
    """One panel per key, plotted against the first of ``x_keys`` that the rows carry."""
    xk = x_key(rows, x_keys)
    keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if xk is None or not keys:
        return None
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r[xk], r[key]) for r in rows if xk in r and isinstance(r.get(key), (int, float))]
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(xk)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def img_tag(png: bytes, alt: str) -> str:
    """An inline <img> of PNG bytes, so that a report is one self-contained file."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
