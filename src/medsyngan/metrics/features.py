"""Feature extractors for the distribution metrics (FD/FID, KID, precision/recall, density/coverage).

Three networks, each with a protocol tag that goes into the metric's name:

- ``inception``: the FID Inception-v3; images resized to 299 the clean-fid way (PIL bicubic on the uint8
  values, per channel, in float) and greyscale repeated to three channels.
- ``random``: a seeded, randomly initialised conv net (Naeem et al. 2020 found random embeddings informative
  outside ImageNet). Always available, but its numbers compare only with numbers from the same seed.
- ``ts-<name>-<hash>``: a user TorchScript module (e.g. a chest-X-ray classifier's trunk). Contract: input
  float [B, 1, S, S] in [0, 1] at the dataset's resolution; output [B, ...], flattened to [B, D].

Feature matrices of real sets are cached under a hash of the pixels and the extractor (see
:func:`cached_features`), so re-evaluating many snapshots against one real set extracts it once.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from medsyngan.errors import UserError
from medsyngan.rundir import atomic_write_bytes, progress
from medsyngan.runtime import cache_dir

FEATURE_CACHE_VERSION = 1
RANDOM_NET_SIZE = 64


def resize_clean(images_u8: np.ndarray, size: int) -> np.ndarray:
    """clean-fid's resize: PIL bicubic on the uint8 values held as float32 (mode 'F'), clipped to [0, 255].

    Returns float32 [N, size, size] in [0, 255]. Resizing in float avoids the quantisation and the aliasing
    that resizing uint8 tensors with torch's bilinear would add (Parmar et al. 2022).
    """
    out = np.empty((len(images_u8), size, size), np.float32)
    for i, img in enumerate(images_u8):
        pil = Image.fromarray(np.asarray(img, dtype=np.float32))
        out[i] = np.asarray(pil.resize((size, size), resample=Image.Resampling.BICUBIC)).clip(0, 255)
    return out


class FeatureExtractor:
    """Maps uint8 images [B, S, S] to float32 features [B, D]."""

    tag: str
    cache_key: str

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def embed(self, images_u8: np.ndarray) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images_u8: np.ndarray) -> np.ndarray:
        return self.embed(np.asarray(images_u8)).float().flatten(1).cpu().numpy()


class InceptionExtractor(FeatureExtractor):
    tag = "inception"

    def __init__(self, device="cpu", weights_path: str | Path | None = None, net: nn.Module | None = None):
        """``net``: an already built network (benchmarks time the architecture without the published file)."""
        super().__init__(device)
        from medsyngan.metrics.inception import INPUT_SIZE, load_inception

        self.net = net.to(self.device) if net is not None else load_inception(weights_path, self.device)
        self.size = INPUT_SIZE
        self.cache_key = "inception-2015-12-05-cleanresize"

    def embed(self, images_u8):
        x = torch.from_numpy(resize_clean(images_u8, self.size)).to(self.device) / 255.0
        return self.net(x[:, None].expand(-1, 3, -1, -1))


class RandomConvNet(nn.Module):
    """Five 3×3 conv layers (four of stride 2), LeakyReLU, He-normal weights drawn from a seeded generator; 64×64 input, 512-d output
    (the last map average-pooled to 2×2 so that the embedding keeps coarse layout, which matters for X-rays)."""

    WIDTHS = (32, 64, 128, 128, 128)

    def __init__(self, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        cin = 1
        for i, width in enumerate(self.WIDTHS):
            conv = nn.Conv2d(cin, width, 3, stride=1 if i == 0 else 2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / conv.weight[0].numel()) ** 0.5)
                conv.bias.zero_()
            layers += [conv, nn.LeakyReLU(0.2)]
            cin = width
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.body(x), 2), 1)


class RandomExtractor(FeatureExtractor):
    def __init__(self, device="cpu", seed: int = 0):
        super().__init__(device)
        self.net = RandomConvNet(seed).eval().requires_grad_(False).to(self.device)
        self.tag = "random" if seed == 0 else f"random{seed}"
        self.cache_key = f"randomconv-v2-seed{seed}"

    def embed(self, images_u8):
        x = torch.from_numpy(np.array(images_u8, copy=True)).to(self.device).float()[:, None] / 255.0
        if x.shape[-1] != RANDOM_NET_SIZE:
            x = F.interpolate(x, size=(RANDOM_NET_SIZE, RANDOM_NET_SIZE), mode="bilinear", antialias=True,
                              align_corners=False)
        return self.net(x * 2 - 1)


class TorchScriptExtractor(FeatureExtractor):
    def __init__(self, path: str | Path, device="cpu"):
        super().__init__(device)
        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"feature extractor {path} not found; use 'inception', 'random' or a TorchScript file path"
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
        try:
            self.net = torch.jit.load(str(path), map_location=self.device).eval()
        except Exception as exc:  # torch raises RuntimeError or ValueError for files that are not TorchScript
            raise UserError(f"{path}: not a TorchScript module ({exc}); save it with torch.jit.save") from None
        stem = "".join(ch for ch in path.stem.lower() if ch.isalnum())[:16] or "model"
        self.tag = f"ts-{stem}-{digest}"
        self.cache_key = f"torchscript-{digest}"

    def embed(self, images_u8):
        x = torch.from_numpy(np.array(images_u8, copy=True)).to(self.device).float()[:, None] / 255.0
        out = self.net(x)
        if not isinstance(out, torch.Tensor) or out.shape[0] != x.shape[0]:
            raise UserError("the TorchScript feature extractor must return one tensor [B, ...] per batch of B images")
        return out


def make_extractor(spec: str, device: torch.device | str = "cpu", seed: int = 0) -> FeatureExtractor:
    """``spec``: 'inception', 'random', or a path to a TorchScript file."""
    if spec == "inception":
        return InceptionExtractor(device)
    if spec == "random":
        return RandomExtractor(device, seed)
    if spec.endswith((".pt", ".pth", ".ts", ".jit")) or Path(spec).exists():
        return TorchScriptExtractor(spec, device)
    raise UserError(f"feature extractor '{spec}' unknown; use 'inception', 'random' or a TorchScript file path")


def extract(extractor: FeatureExtractor, images_u8: np.ndarray, batch_size: int = 64, desc: str = "") -> np.ndarray:
    chunks = []
    with progress() as bar:
        task = bar.add_task(desc or f"features ({extractor.tag})", total=len(images_u8))
        for start in range(0, len(images_u8), batch_size):
            chunks.append(extractor(images_u8[start : start + batch_size]))
            bar.advance(task, len(chunks[-1]))
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def images_digest(images_u8: np.ndarray) -> str:
    digest = hashlib.sha256(f"{images_u8.shape}|{images_u8.dtype}".encode())
    for start in range(0, len(images_u8), 4096):
        digest.update(np.ascontiguousarray(images_u8[start : start + 4096]).tobytes())
    return digest.hexdigest()


def cached_features(extractor: FeatureExtractor, images_u8: np.ndarray, batch_size: int = 64, desc: str = "") -> np.ndarray:
    """Features of a real set, cached in ``cache_dir()/features`` under sha256(pixels, shape, extractor)."""
    key = hashlib.sha256(
        f"{FEATURE_CACHE_VERSION}|{extractor.cache_key}|{images_digest(images_u8)}".encode()
    ).hexdigest()[:32]
    path = cache_dir() / "features" / f"{key}.npy"
    if path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError):
            path.unlink(missing_ok=True)  # a torn cache entry: recompute it
    feats = extract(extractor, images_u8, batch_size, desc)
    buf = io.BytesIO()
    np.save(buf, feats)
    atomic_write_bytes(path, buf.getvalue())
    return feats
