"""Feature networks: the random-feature FD separates phantoms, noise and real NIH images; caching; TorchScript."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsyngan.errors import UserError
from medsyngan.metrics import features, fid
from medsyngan.metrics.images import read_image_folder


@pytest.fixture(scope="module")
def nih64(nih_dir):
    return read_image_folder(nih_dir / "images-64")


@pytest.fixture(scope="module")
def phantoms64():
    from medsyngan.data.phantoms import plan_phantoms, render

    return np.stack([render(anatomy, shot, 64) for _, anatomy, shot in plan_phantoms(200, 1, seed=0)])


@pytest.mark.slow
def test_random_fd_separates_sets_and_halves_score_near_zero(nih64, phantoms64):
    ext = features.RandomExtractor()
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (100, 64, 64), dtype=np.uint8)
    nih = nih64[rng.permutation(len(nih64))[:400]]
    f_nih_a, f_nih_b = ext(nih[:200]), ext(nih[200:])
    f_ph_a, f_ph_b = ext(phantoms64[:100]), ext(phantoms64[100:])
    f_noise = ext(noise)
    within = max(fid.fd_from_features(f_nih_a, f_nih_b), fid.fd_from_features(f_ph_a, f_ph_b))
    to_noise = min(fid.fd_from_features(f_ph_a, f_noise), fid.fd_from_features(f_nih_a, f_noise))
    # measured (phantoms v2): halves 1.5 (NIH) and 1.6 (phantoms); phantoms↔NIH 5.3, either↔noise 27–30
    assert to_noise > 10 * within, (to_noise, within)
    assert fid.fd_from_features(f_ph_a, f_nih_a) > 2 * within


def test_random_network_is_deterministic_and_seeded():
    x = np.random.default_rng(1).integers(0, 256, (4, 64, 64), dtype=np.uint8)
    a, b, c = features.RandomExtractor(seed=0)(x), features.RandomExtractor(seed=0)(x), features.RandomExtractor(seed=1)(x)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 512) and not np.allclose(a, c)
    assert features.RandomExtractor()(np.zeros((1, 128, 128), np.uint8)).shape == (1, 512)  # any resolution


def test_clean_resize_is_pil_bicubic_on_float():
    from PIL import Image

    img = np.random.default_rng(2).integers(0, 256, (1, 64, 64), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(img[0].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC))
    np.testing.assert_allclose(features.resize_clean(img, 299)[0], ref.clip(0, 255))


def test_real_features_are_cached_under_a_hash_of_pixels_and_extractor(medsyngan_cache):
    x = np.random.default_rng(3).integers(0, 256, (10, 64, 64), dtype=np.uint8)
    ext = features.RandomExtractor()
    before = set((medsyngan_cache / "features").glob("*.npy")) if (medsyngan_cache / "features").exists() else set()
    first = features.cached_features(ext, x)
    created = set((medsyngan_cache / "features").glob("*.npy")) - before
    assert len(created) == 1
    np.testing.assert_array_equal(np.load(created.pop()), first)
    features.cached_features(ext, x)
    features.cached_features(features.RandomExtractor(seed=1), x)
    x2 = x.copy()
    x2[0, 0, 0] ^= 1
    features.cached_features(ext, x2)
    assert len(set((medsyngan_cache / "features").glob("*.npy")) - before) == 3


def test_torchscript_extractor(tmp_path):
    class Tiny(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 4)

    path = tmp_path / "chest-model.pt"
    torch.jit.save(torch.jit.script(Tiny()), str(path))
    ext = features.make_extractor(str(path))
    assert ext.tag.startswith("ts-chestmodel-")
    x = np.full((3, 32, 32), 255, np.uint8)
    np.testing.assert_allclose(ext(x), np.ones((3, 16)))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a TorchScript"):
        features.make_extractor(str(tmp_path / "junk.pt"))
    with pytest.raises(UserError, match="unknown"):
        features.make_extractor("vgg")
