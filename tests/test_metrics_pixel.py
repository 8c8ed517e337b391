"""SSIM, PSNR, MSE and the batched nearest-neighbour search against scikit-image on real 64-px NIH images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsyngan.errors import UserError
from medsyngan.metrics import pixel
from medsyngan.metrics.images import read_image_folder

skmetrics = pytest.importorskip("skimage.metrics", reason="scikit-image is the test-only reference")


@pytest.fixture(scope="module")
def nih64(nih_dir):
    return read_image_folder(nih_dir / "images-64")[:60]


def _sk_ssim(a, b):
    return skmetrics.structural_similarity(
        a / 255.0, b / 255.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
    )


def test_ssim_psnr_mse_match_scikit_image(nih64):
    a, b = nih64[:20], nih64[20:40]
    ssim = pixel.ssim_pairs(pixel.to_unit(a), pixel.to_unit(b)).numpy()
    mse, psnr = pixel.mse_psnr_pairs(pixel.to_unit(a), pixel.to_unit(b))
    for i in range(len(a)):
        assert abs(ssim[i] - _sk_ssim(a[i], b[i])) < 1e-3
        assert abs(mse[i].item() - skmetrics.mean_squared_error(a[i] / 255.0, b[i] / 255.0)) < 1e-3
        assert abs(psnr[i].item() - skmetrics.peak_signal_noise_ratio(a[i] / 255.0, b[i] / 255.0, data_range=1.0)) < 1e-3


def test_nearest_neighbour_search_matches_exhaustive_scikit_image(nih64):
    fake, train = nih64[:8], nih64[8:40]
    train = np.concatenate([train, fake[:2]])  # two exact copies must be found
    nn = pixel.nearest_neighbours(fake, train, pair_block=50)  # blocks that do not divide the sets
    ssim = np.array([[_sk_ssim(f, t) for t in train] for f in fake])
    mse = np.array([[skmetrics.mean_squared_error(f / 255.0, t / 255.0) for t in train] for f in fake])
    np.testing.assert_allclose(nn.ssim, ssim.max(1), atol=1e-3)
    np.testing.assert_array_equal(nn.ssim_index, ssim.argmax(1))
    np.testing.assert_allclose(nn.mse, mse.min(1), atol=1e-6)
    np.testing.assert_array_equal(nn.mse_index, mse.argmin(1))
    assert nn.ssim[:2] == pytest.approx(1.0, abs=1e-5) and list(nn.ssim_index[:2]) == [len(train) - 2, len(train) - 1]


def test_ms_ssim_identity_and_single_scale(nih64):
    x = pixel.to_unit(nih64[:6])
    assert pixel.ms_ssim_pairs(x, x).numpy() == pytest.approx(1.0, abs=1e-6)
    # at 16 px only one scale fits the window: MS-SSIM is SSIM itself
    small = torch.nn.functional.avg_pool2d(x[:, None], 4)[:, 0]
    other = small.roll(1, 0)
    assert pixel.ms_ssim_scales(16) == 1
    np.testing.assert_allclose(
        pixel.ms_ssim_pairs(small, other).numpy(), pixel.ssim_pairs(small, other).numpy().clip(0), atol=1e-6
    )
    assert pixel.ms_ssim_scales(64) == 3 and pixel.ms_ssim_scales(256) == 5


def test_ms_ssim_diversity_detects_collapse(nih64):
    collapsed = np.repeat(nih64[:1], 20, axis=0)
    assert pixel.ms_ssim_diversity(collapsed, 50) == pytest.approx(1.0, abs=1e-6)
    assert pixel.ms_ssim_diversity(nih64, 50) < 0.9


def test_bad_inputs_are_one_line():
    with pytest.raises(UserError, match="differs|resolution|×"):
        pixel.nearest_neighbours(np.zeros((2, 32, 32), np.uint8), np.zeros((2, 64, 64), np.uint8))
    with pytest.raises(UserError, match="at least 11"):
        pixel.ssim_pairs(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8))
    with pytest.raises(UserError, match="at least 2"):
        pixel.ms_ssim_diversity(np.zeros((1, 64, 64), np.uint8))
