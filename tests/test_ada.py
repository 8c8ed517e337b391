"""Discriminator augmentation: identity at p = 0, per-sample transforms, gradients, the low-pass resampling, the
adaptive p and determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medsyngan.training.ada import AdaptiveP, AugmentPipe, DiffAugment, resample

PIPES = {
    "ada": lambda p: AugmentPipe(p, xflip=True),
    "diffaugment": lambda p: DiffAugment(p),
}


def images(n: int = 6, side: int = 32, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, side, side, generator=gen, dtype=dtype) * 2 - 1)


def drawn(kind: str, n: int = 6, seed: int = 0, **image_args) -> tuple:
    """A p = 1 pipe of ``kind``, n images and n draws of its random numbers."""
    pipe = PIPES[kind](1.0)
    return pipe, images(n, **image_args), pipe.draw(n, torch.Generator().manual_seed(seed))


def cosine(side: int, fx: float, fy: float = 0.0, phase: float = 0.3) -> torch.Tensor:
    """cos(2π(fx·x + fy·y) + phase), frequencies in cycles per pixel, as a (1, 1, side, side) image."""
    yy, xx = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                            indexing="ij")
    return torch.cos(2 * math.pi * (fx * xx + fy * yy) + phase).view(1, 1, side, side)


# --- the shared per-sample contract ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PIPES)
def test_p_zero_is_the_identity(kind):
    x = images()
    assert torch.equal(PIPES[kind](0.0)(x, generator=torch.Generator().manual_seed(1)), x)


@pytest.mark.parametrize("kind", PIPES)
def test_p_one_changes_every_image(kind):
    x = images()
    out = PIPES[kind](1.0)(x, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert ((out - x).flatten(1).abs().amax(1) > 1e-3).all()


@pytest.mark.parametrize("kind", PIPES)
def test_changing_one_image_never_changes_another(kind):
    pipe, x, draws = drawn(kind, seed=2)
    before = pipe.apply(x, draws)
    changed = x.clone()
    changed[3] = -changed[3].flip(-1)
    after = pipe.apply(changed, draws)
    others = [i for i in range(len(x)) if i != 3]
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-6)
    assert not torch.allclose(after[3], before[3])


@pytest.mark.parametrize("kind", PIPES)
def test_an_image_is_transformed_alike_alone_or_in_any_batch(kind):
    # What the DP loop engine relies on: it evaluates real[i:i+1] alone.
    pipe, x, draws = drawn(kind, seed=3)
    batch = pipe.apply(x, draws)
    for i in range(len(x)):
        torch.testing.assert_close(pipe.apply(x[i:i + 1], draws[i:i + 1])[0], batch[i], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", PIPES)
def test_the_same_draw_gives_the_same_transform(kind):
    pipe, x, draws = drawn(kind, n=4, seed=4)
    x[1] = x[0]
    x[2] = x[0]
    draws[1] = draws[0]
    out = pipe.apply(x, draws)
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=1e-6)
    assert not torch.allclose(out[2], out[0]), "another draw must give another transform"


@pytest.mark.parametrize("kind", PIPES)
def test_gradients_flow_to_the_images(kind):
    pipe, x, draws = drawn(kind, n=3, seed=5, side=12, dtype=torch.float64)
    x.requires_grad_(True)
    fn = lambda t: pipe.apply(t, draws)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
    (grad,) = torch.autograd.grad(fn(x).square().sum(), x)
    assert (grad.flatten(1).abs().sum(1) > 0).all()


def test_second_derivatives_flow_through_the_pipe():
    # R1 and WGAN-GP differentiate D(pipe(x)) with respect to x, then that gradient with respect to D's weights.
    pipe, x, draws = drawn("ada", n=2, seed=6, side=12, dtype=torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda t: pipe.apply(t, draws).square(), (x,), fast_mode=True)


# --- determinism ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PIPES)
def test_a_generator_seed_fixes_the_output(kind):
    pipe, x = PIPES[kind](0.5), images()
    first = pipe(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(pipe(x, generator=torch.Generator().manual_seed(7)), first)
    assert not torch.equal(pipe(x, generator=torch.Generator().manual_seed(8)), first)


@pytest.mark.parametrize("kind", PIPES)
def test_random_numbers_drawn_depend_on_the_batch_size_only(kind):
    # Neither p nor the images decide how far the stream advances, so a resumed run replays the same draws.
    states = []
    for p, seed in ((0.1, 0), (0.9, 1)):
        gen = torch.Generator().manual_seed(9)
        PIPES[kind](p)(images(seed=seed), generator=gen)
        states.append(gen.get_state())
    assert torch.equal(states[0], states[1])


def test_probability_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        AugmentPipe(1.5)
    pipe = DiffAugment()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pipe.p = -0.1


# --- the geometric resampling ---------------------------------------------------------------------------------


def test_constant_image_stays_constant_under_every_geometric_transform():
    pipe = AugmentPipe(1.0, xflip=True, brightness=False, contrast=False, scale_std=0.5, aniso_std=0.5)
    x = torch.full((64, 1, 32, 32), 0.3)
    out = pipe(x, generator=torch.Generator().manual_seed(10))
    # Symmetric extension keeps the border constant too, and each polyphase filter sums to 1: no ringing anywhere.
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)


def test_integer_shift_of_a_smooth_image_is_an_exact_shift_inside():
    s = cosine(64, 1 / 16, 1 / 21)
    inverse = torch.tensor([[[1.0, 0.0, -3.0], [0.0, 1.0, 2.0]]])  # content 3 px right, 2 px up
    out = resample(s, inverse)
    torch.testing.assert_close(out[..., 8:-8, 8:-8], s.roll((-2, 3), (2, 3))[..., 8:-8, 8:-8], rtol=0, atol=2e-3)


def test_quarter_turn_matches_rot90():
    s = cosine(64, 1 / 16, 1 / 21)
    turn = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]])
    torch.testing.assert_close(resample(s, turn), s.rot90(1, (2, 3)), rtol=0, atol=1e-2)


def test_zooming_out_filters_fine_detail_instead_of_aliasing_it():
    # 0.4 cycles/px shrunk 2x is 0.8 cycles/px, above the output Nyquist: it must vanish, not fold to 0.2 cycles/px
    # as plain bilinear sampling makes it. The centre reads only source pixels inside the film (no reflection seam).
    s = cosine(64, 0.4)
    inverse = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
    ours = resample(s, inverse)[..., 20:-20, 20:-20]
    grid = F.affine_grid(inverse, [1, 1, 64, 64], align_corners=False)
    plain = F.grid_sample(s, grid, padding_mode="reflection", align_corners=False)[..., 20:-20, 20:-20]
    assert plain.abs().max() > 0.25
    assert ours.abs().max() < 0.02


def test_horizontal_flip_is_off_by_default():
    draws = torch.zeros(1, len(AugmentPipe.columns))  # every transform drawn, flip chosen
    default = AugmentPipe(1.0).inverse_matrices(draws, 32, 32)
    flipping = AugmentPipe(1.0, xflip=True).inverse_matrices(draws, 32, 32)
    assert default[0, 0, 0] > 0 and flipping[0, 0, 0] < 0


def test_bfloat16_images_come_back_in_bfloat16():
    x = images().bfloat16()
    out = AugmentPipe(1.0)(x, generator=torch.Generator().manual_seed(11))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_autocast_does_not_lower_the_resampling_precision():
    pipe, x, draws = drawn("ada", seed=13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = pipe.apply(x, draws)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, pipe.apply(x, draws), rtol=0, atol=1e-6)


def test_training_after_a_first_call_under_inference_mode():
    # The resampling matrices are cached per size; one built under inference mode must not poison autograd.
    with torch.inference_mode():
        AugmentPipe(1.0)(images(2, side=20))
    x = images(2, side=20).requires_grad_(True)
    AugmentPipe(1.0)(x, generator=torch.Generator().manual_seed(12)).sum().backward()
    assert x.grad.abs().sum() > 0


# --- the adaptive probability ---------------------------------------------------------------------------------


def test_p_rises_when_d_is_confident_on_reals():
    ada = AdaptiveP(target=0.6, interval=4, ada_kimg=1.0)
    for _ in range(3):
        assert ada.observe(torch.ones(32)) == 0.0  # nothing moves before the interval is complete
    assert ada.observe(torch.ones(32)) == pytest.approx(32 * 4 / 1000)
    assert ada.r_t == 1.0


def test_p_falls_when_d_is_not_overconfident_and_stays_in_range():
    ada = AdaptiveP(target=0.6, interval=2, ada_kimg=0.1, p=0.5)
    logits = torch.tensor([1.0, 1.0, -1.0, 2.0])  # r_t = 0.5 < 0.6
    ada.observe(logits)
    assert ada.observe(logits) == pytest.approx(0.5 - 8 / 100)
    for _ in range(40):
        ada.observe(-torch.ones(4))
    assert ada.p == 0.0
    for _ in range(100):
        ada.observe(torch.ones(4))
    assert ada.p == ada.p_max < 1.0


def test_p_holds_when_r_t_is_on_target():
    ada = AdaptiveP(target=0.5, interval=1, p=0.3)
    assert ada.accumulate(sign_sum=2.0, count=4) == 0.3


def test_adjustment_uses_the_images_counted():
    # Aggregated (federation) or DP-noised sums come with their own count, e.g. an expected batch size.
    ada = AdaptiveP(target=0.6, interval=1, ada_kimg=1.0)
    assert ada.accumulate(sign_sum=90.0, count=100) == pytest.approx(0.1)


def test_state_round_trips_mid_interval():
    ada = AdaptiveP(interval=3, ada_kimg=0.5, p=0.2)
    for value in (1.0, -1.0, 1.0, 1.0):
        ada.observe(torch.full((8,), value))
    restored = AdaptiveP(interval=3, ada_kimg=0.5)
    restored.load_state_dict(ada.state_dict())
    assert restored.state_dict() == ada.state_dict()
    for value in (1.0, -1.0, -1.0):
        assert restored.observe(torch.full((8,), value)) == ada.observe(torch.full((8,), value))
    assert restored.p != 0.2


def test_bad_state_and_settings_are_refused():
    with pytest.raises(KeyError, match="ADA state"):
        AdaptiveP().load_state_dict({"p": 0.1})
    with pytest.raises(ValueError, match="p_max"):
        AdaptiveP(p_max=1.0)
    with pytest.raises(ValueError, match="interval"):
        AdaptiveP(interval=0)
