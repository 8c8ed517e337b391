"""LPIPS (Zhang et al. 2018), VGG16 variant v0.1, written in torch without torchvision.

Two published files are needed: torchvision's ImageNet VGG16 (``vgg16-397923af.pth``; only ``features.*`` is
used) and the LPIPS linear heads (``vgg.pth`` of the ``lpips`` package, v0.1: keys ``lin{0..4}.model.1.weight``).
They are found with the same policy as the Inception weights (see :mod:`medsyngan.metrics.weights`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from medsyngan.errors import UserError
from medsyngan.metrics import weights
from medsyngan.metrics.inception import load_state_dict_checked

VGG16_WEIGHTS = weights.WeightFile(
    label="VGG16 (torchvision ImageNet, for LPIPS)",
    filenames=("vgg16-397923af.pth",),
    url="https://download.pytorch.org/models/vgg16-397923af.pth",
    env_var="MEDSYNGAN_VGG16_WEIGHTS",
    sha256_prefix="397923af",
)
LPIPS_LIN_WEIGHTS = weights.WeightFile(
    label="LPIPS v0.1 VGG linear layers",
    filenames=("lpips-vgg-v0.1.pth", "vgg.pth"),
    url="https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/vgg.pth",
    env_var="MEDSYNGAN_LPIPS_WEIGHTS",
    sha256_prefix=None,
)
# torchvision's vgg16().features: conv widths, "M" for max-pool; LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAP_CHANNELS = (64, 128, 256, 512, 512)


class _Lin(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        # index 1 as in the lpips package (index 0 is a dropout), so that the published keys match
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """Inputs: float [B, 3, H, W] in [-1, 1] (greyscale repeated). Output: distance per pair, shape [B]."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for item in _VGG16_CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(item), 3, padding=1), nn.ReLU()]
                cin = int(item)
        self.features = nn.Sequential(*layers)
        self.taps = {3, 8, 15, 22, 29}  # indices of the tapped ReLUs in ``features``
        for i, c in enumerate(_TAP_CHANNELS):
            setattr(self, f"lin{i}", _Lin(c))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        x = (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(a.shape[0], device=a.device)
        for i, (fa, fb) in enumerate(zip(self._taps(a), self._taps(b))):
            lin = getattr(self, f"lin{i}").model[1]
            total = total + lin((fa - fb) ** 2).mean(dim=(1, 2, 3))
        return total


def load_lpips(
    vgg_path: str | Path | None = None, lin_path: str | Path | None = None, device: torch.device | str = "cpu"
) -> LPIPS:
    model = LPIPS()
    vgg_file = weights.resolve(VGG16_WEIGHTS, vgg_path)
    lin_file = weights.resolve(LPIPS_LIN_WEIGHTS, lin_path)
    try:
        vgg_state = torch.load(vgg_file, map_location="cpu", weights_only=True)
        lin_state = torch.load(lin_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: torch raises many types here
        raise UserError(f"LPIPS weights cannot be read ({exc}); download them again") from None
    state = {k: v for k, v in vgg_state.items() if k.startswith("features.")}
    state.update(lin_state)
    state["shift"], state["scale"] = model.shift, model.scale
    load_state_dict_checked(model, state, f"{vgg_file} + {lin_file}")
    return model.eval().requires_grad_(False).to(device)
