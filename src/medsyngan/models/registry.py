"""Build a generator or discriminator from the ``[model]`` configuration section.

Every generator has attributes ``z_dim``, ``c_dim`` and ``resolution`` and maps z (B, z_dim) to images
(B, 1, R, R); every discriminator maps images (B, 1, R, R) to logits (B,). A conditional network
(``model.condition`` not empty, ``c_dim`` the length of its label vector, :mod:`medsyngan.data.labels`) takes the
labels as ``c`` (B, c_dim): ``G(z, c=c)``, ``D(x, c)``; a generator built here also names its label groups in
``label_groups``. ProGAN networks also have ``set_stage(res, alpha)``; StyleGAN2 and StyleGAN3 generators have
``mapping``, ``synthesis`` and ``num_ws``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from medsyngan.config import ModelSection
from medsyngan.data.labels import LabelLayout
from medsyngan.errors import UserError
from medsyngan.models import dcgan, progan, stylegan2, stylegan3

SUPPORTED_RESOLUTIONS: dict[str, tuple[int, ...]] = {
    "dcgan": dcgan.SUPPORTED_RESOLUTIONS,
    "progan": progan.SUPPORTED_RESOLUTIONS,
    "stylegan2": stylegan2.SUPPORTED_RESOLUTIONS,
    "stylegan3": stylegan3.SUPPORTED_RESOLUTIONS,
}


def label_dim(cfg: ModelSection) -> int:
    """Length of the label vector the networks are conditioned on (0: unconditional)."""
    return LabelLayout.of(cfg.condition).dim


_GENERATORS: dict[str, Callable[[ModelSection], nn.Module]] = {
    "dcgan": lambda cfg: dcgan.DCGANGenerator(cfg.resolution, z_dim=cfg.z_dim, ngf=cfg.ngf, c_dim=label_dim(cfg)),
    "progan": lambda cfg: progan.ProGANGenerator(
        cfg.resolution, z_dim=cfg.z_dim, fmap_base=cfg.fmap_base, fmap_max=cfg.fmap_max, c_dim=label_dim(cfg)
    ),
    "stylegan2": lambda cfg: stylegan2.StyleGAN2Generator(
        cfg.resolution, z_dim=cfg.z_dim, w_dim=cfg.w_dim, mapping_layers=cfg.mapping_layers,
        fmap_base=cfg.fmap_base, fmap_max=cfg.fmap_max, c_dim=label_dim(cfg),
    ),
    "stylegan3": lambda cfg: stylegan3.StyleGAN3Generator(
        cfg.resolution, z_dim=cfg.z_dim, w_dim=cfg.w_dim, mapping_layers=cfg.mapping_layers,
        fmap_base=cfg.fmap_base, fmap_max=cfg.fmap_max, config=cfg.sg3_config, num_layers=cfg.sg3_layers,
        magnitude_ema_beta=cfg.sg3_magnitude_ema_beta, c_dim=label_dim(cfg),
    ),
}

_DISCRIMINATORS: dict[str, Callable[[ModelSection], nn.Module]] = {
    "dcgan": lambda cfg: dcgan.DCGANDiscriminator(cfg.resolution, ndf=cfg.ndf, dp_compatible=cfg.dp_compatible,
                                                  c_dim=label_dim(cfg)),
    "progan": lambda cfg: progan.ProGANDiscriminator(
        cfg.resolution, fmap_base=cfg.fmap_base, fmap_max=cfg.fmap_max, dp_compatible=cfg.dp_compatible,
        c_dim=label_dim(cfg),
    ),
    "stylegan2": lambda cfg: stylegan2.StyleGAN2Discriminator(
        cfg.resolution, fmap_base=cfg.fmap_base, fmap_max=cfg.fmap_max, dp_compatible=cfg.dp_compatible,
        c_dim=label_dim(cfg), mapping_layers=cfg.mapping_layers,
    ),
}
# StyleGAN3 trains against StyleGAN2's residual discriminator, as NVlabs does.
_DISCRIMINATORS["stylegan3"] = _DISCRIMINATORS["stylegan2"]


def check_model_section(cfg: ModelSection) -> None:
    """Raise a one-line UserError for an unknown architecture or a resolution it does not support."""
    if cfg.arch not in SUPPORTED_RESOLUTIONS:
        known = ", ".join(sorted(SUPPORTED_RESOLUTIONS))
        raise UserError(f"model.arch '{cfg.arch}' is unknown; use one of: {known}")
    supported = SUPPORTED_RESOLUTIONS[cfg.arch]
    if cfg.resolution not in supported:
        listed = ", ".join(str(r) for r in supported)
        raise UserError(
            f"model.resolution {cfg.resolution} is not supported by {cfg.arch}; use one of: {listed}"
        )


def build_generator(cfg: ModelSection) -> nn.Module:
    check_model_section(cfg)
    G = _GENERATORS[cfg.arch](cfg)
    G.label_groups = LabelLayout.of(cfg.condition).groups
    return G


def build_discriminator(cfg: ModelSection) -> nn.Module:
    check_model_section(cfg)
    return _DISCRIMINATORS[cfg.arch](cfg)
