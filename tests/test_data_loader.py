"""BatchLoader and augmentation: values, epoch coverage, exact resume, augmentation semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsyngan.config import AugmentSection
from medsyngan.data.augment import augment_batch
from medsyngan.data.loader import BatchLoader
from medsyngan.errors import UserError


def _images(n: int = 50, s: int = 8) -> np.ndarray:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (n, s, s), dtype=np.uint8)
    imgs[:, 0, 0] = np.arange(n)  # a tag that identifies the image in a batch
    return imgs


def _tags(x: torch.Tensor) -> list[int]:
    return [int(round(v)) for v in ((x[:, 0, 0, 0] + 1) * 127.5).tolist()]


def test_values_are_linear_map_to_minus_one_one():
    imgs = _images()
    loader = BatchLoader(imgs, 10, seed=1, device="cpu")
    x = next(loader)
    assert x.shape == (10, 1, 8, 8) and x.dtype == torch.float32
    expected = torch.from_numpy(imgs[_tags(x)].astype(np.float64) / 127.5 - 1.0).unsqueeze(1)
    torch.testing.assert_close(x.double(), expected, atol=1e-6, rtol=0)


def test_each_epoch_is_a_permutation_and_epochs_differ():
    imgs = _images(50)
    loader = BatchLoader(imgs, 10, seed=3, device="cpu")
    epochs = [sum((_tags(next(loader)) for _ in range(5)), []) for _ in range(2)]
    assert sorted(epochs[0]) == list(range(50)) and sorted(epochs[1]) == list(range(50))
    assert epochs[0] != epochs[1]


def test_drop_last_skips_the_remainder_and_keep_last_yields_it():
    imgs = _images(25)
    drop = BatchLoader(imgs, 10, seed=0, device="cpu")
    assert [next(drop).shape[0] for _ in range(3)] == [10, 10, 10]
    assert drop.epoch == 1
    keep = BatchLoader(imgs, 10, seed=0, device="cpu", drop_last=False)
    assert [next(keep).shape[0] for _ in range(4)] == [10, 10, 5, 10]


def test_resume_replays_exactly_the_same_batches_with_augmentation():
    imgs = _images(37)
    aug = AugmentSection(hflip_p=0.5, rotate_p=0.5, zoom_p=0.5)
    a = BatchLoader(imgs, 8, seed=5, device="cpu", augment=aug)
    for _ in range(7):  # crosses an epoch boundary (4 batches per epoch)
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(6)]
    b = BatchLoader(imgs, 8, seed=5, device="cpu", augment=aug)
    b.load_state_dict(state)
    for want in expected:
        torch.testing.assert_close(next(b), want, rtol=0, atol=0)


def test_state_from_other_data_is_refused():
    a = BatchLoader(_images(30), 8, seed=0, device="cpu")
    b = BatchLoader(_images(31), 8, seed=0, device="cpu")
    with pytest.raises(UserError, match="batch_size"):
        b.load_state_dict(a.state_dict())


def test_batch_larger_than_dataset_is_a_user_error():
    with pytest.raises(UserError, match="train.batch_size"):
        BatchLoader(_images(5), 8, seed=0, device="cpu")


def test_flip_with_probability_one_mirrors_every_image():
    x = torch.rand(4, 1, 6, 6) * 2 - 1
    out = augment_batch(x, AugmentSection(hflip_p=1.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x.flip(-1))


def test_zero_probabilities_leave_images_untouched():
    x = torch.rand(4, 1, 6, 6)
    out = augment_batch(x, AugmentSection(), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x)


def test_rotation_turns_a_blob_about_the_centre_by_the_drawn_angle():
    s = 65
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float64), torch.arange(s, dtype=torch.float64), indexing="ij")
    blob = torch.exp(-((xx - 44) ** 2 + (yy - 32) ** 2) / 8.0).float().view(1, 1, s, s).repeat(8, 1, 1, 1)
    out = augment_batch(blob, AugmentSection(rotate_p=1.0, rotate_deg=30.0), torch.Generator().manual_seed(4))
    # The same stream the augmentation drew from: 7 uniforms per image, the third is the angle.
    u = torch.rand((8, 7), generator=torch.Generator().manual_seed(4))
    angles = torch.rad2deg((2 * u[:, 2] - 1) * torch.deg2rad(torch.tensor(30.0)))
    c = (s - 1) / 2
    for img, angle in zip(out[:, 0].double(), angles.double()):
        w = img / img.sum()
        cx, cy = float((w * xx).sum()) - c, float((w * yy).sum()) - c
        assert abs(np.hypot(cx, cy) - 12.0) < 0.3
        turned = np.degrees(np.arctan2(cy, cx))
        assert abs(abs(turned) - abs(float(angle))) < 1.0


def test_per_image_probability_is_respected():
    x = torch.rand(2000, 1, 4, 4)
    out = augment_batch(x, AugmentSection(hflip_p=0.3), torch.Generator().manual_seed(0))
    flipped = (out - x).abs().flatten(1).amax(1) > 0
    assert 0.25 < flipped.float().mean().item() < 0.35
