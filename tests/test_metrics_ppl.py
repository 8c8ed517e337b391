"""PPL on generators whose path length is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medsyngan.errors import UserError
from medsyngan.metrics import ppl


def _mean_sq(a, b):
    return ((a - b) ** 2).flatten(1).mean(1)


class ZImage(torch.nn.Module):
    """G(z) = z laid out as a 16×16 image: the path length is the slerp's angular speed, squared."""

    z_dim = 256

    def forward(self, z):
        return z.view(-1, 1, 16, 16)


class WImage(torch.nn.Module):
    z_dim = 256

    def mapping(self, z):
        return z

    def synthesis(self, w, noise_mode="random"):
        assert noise_mode == "const"
        return w.view(-1, 1, 16, 16)


def test_z_slerp_path_length_is_the_angle_squared():
    # |d/dt slerp| · √d = θ · √d, mean-squared over d pixels → θ²; Gaussian pairs in 256-d sit near θ = π/2
    value, raw = ppl.perceptual_path_length(ZImage(), _mean_sq, num_samples=400, batch_size=100)
    assert value == pytest.approx((math.pi / 2) ** 2, rel=0.05)
    assert len(raw) == 400


def test_w_end_path_length_is_the_endpoint_distance():
    # d/dt lerp(w0, w1, t) = w1 − w0; E‖w1 − w0‖²/d = 2 for independent standard normals
    assert ppl.path_kind(WImage()) == "wend"
    value, _ = ppl.perceptual_path_length(WImage(), _mean_sq, num_samples=400, batch_size=100)
    assert value == pytest.approx(2.0, rel=0.05)


def test_percentile_filter_drops_the_tails():
    values = np.r_[np.ones(990), np.full(5, 1e6), np.full(5, -1e6)]  # below 1st / above 99th percentile
    assert ppl.percentile_filtered_mean(values) == pytest.approx(1.0)


def test_ppl_needs_enough_samples():
    with pytest.raises(UserError, match="at least 100"):
        ppl.perceptual_path_length(ZImage(), _mean_sq, num_samples=10)
