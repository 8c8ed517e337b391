"""Update codec: clipping, unbiased stochastic quantization, exact wire and ring round-trips."""

import numpy as np
import pytest
from scipy import stats

from medsyngan.privacy.codec import (
    Layout,
    add_client_dp_noise,
    clip_update,
    decode,
    dequantize,
    dequantize_values,
    encode,
    from_ring,
    pack_ring,
    qmax,
    quantize,
    ring_add,
    ring_bits,
    scales_from_bound,
    scales_from_reference,
    to_ring,
    unpack_ring,
    update_norm,
    wire_stats,
)


def _update(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "G.conv.weight": rng.normal(0, 0.01, (8, 4, 3, 3)).astype(np.float32),
        "G.conv.bias": rng.normal(0, 0.1, (8,)).astype(np.float32),
        "D.fc.weight": rng.normal(0, 1.0, (5, 7)).astype(np.float32),
    }


def test_clip_scales_the_whole_update_to_the_norm():
    update = _update()
    norm = update_norm(update)
    reference = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in update.values()))
    assert norm == pytest.approx(reference)
    clipped, before = clip_update(update, norm / 4)
    assert before == pytest.approx(norm)
    assert update_norm(clipped) == pytest.approx(norm / 4, rel=1e-6)
    # Direction is kept: every tensor is scaled by the same factor.
    for k in update:
        np.testing.assert_allclose(clipped[k], update[k] / 4, rtol=1e-6)
    unchanged, _ = clip_update(update, norm * 2)
    for k in update:
        np.testing.assert_array_equal(unchanged[k], update[k])


@pytest.mark.parametrize("bits", [8, 16])
def test_stochastic_rounding_is_unbiased(bits):
    # With scale 0.25, 0.3 sits 0.2 of a step above 0.25: it must round up with probability 0.2 (binomial
    # test on the count of ups), so that the mean of many quantizations is the value itself.
    x = {"w": np.array([0.3, -0.77, 0.01, 0.6, 0.5], np.float32)}
    scales = np.array([0.25])
    rng = np.random.default_rng(1)
    n = 4000
    draws = np.stack([dequantize(quantize(x, bits, rng, scales))["w"] for _ in range(n)])
    for i, value in enumerate(x["w"].astype(np.float64)):
        low = np.floor(value / 0.25) * 0.25
        frac = (value - low) / 0.25
        assert set(np.unique(draws[:, i])) <= {low, low + 0.25}
        ups = int(np.sum(draws[:, i] > low))
        if frac < 1e-9:
            assert ups == 0  # a grid point is represented exactly
            continue
        assert stats.binomtest(ups, n, frac).pvalue > 1e-3, (bits, value, ups / n)
        assert abs(draws[:, i].mean() - value) < 4 * 0.25 * np.sqrt(frac * (1 - frac) / n)


def test_quantization_error_is_within_one_step_and_seeded():
    update = _update()
    a = quantize(update, 8, np.random.default_rng(5))
    b = quantize(update, 8, np.random.default_rng(5))
    np.testing.assert_array_equal(a.values, b.values)
    deq = dequantize(a)
    for i, name in enumerate(a.layout.names):
        assert np.max(np.abs(deq[name] - update[name])) <= a.scales[i] * (1 + 1e-6)
    assert a.values.dtype == np.int8 and np.max(np.abs(a.values)) <= 127


@pytest.mark.parametrize("compression", ["zlib", "lzma", "none"])
def test_encode_decode_is_exact(compression):
    qu = quantize(_update(), 16, np.random.default_rng(0))
    blob = encode(qu, compression)
    back = decode(blob)
    np.testing.assert_array_equal(back.values, qu.values)
    np.testing.assert_array_equal(back.scales, qu.scales)
    assert back.layout == qu.layout and back.bits == 16
    stats_ = wire_stats(qu, blob)
    assert stats_.float32_bytes == 4 * qu.layout.size and stats_.quantized_bytes == 2 * qu.layout.size
    assert stats_.encoded_bytes == len(blob)


def test_compression_shrinks_a_sparse_update():
    update = {"w": np.zeros(10_000, np.float32)}
    update["w"][::100] = 1.0
    qu = quantize(update, 8, np.random.default_rng(0))
    assert wire_stats(qu, encode(qu)).ratio > 20


def test_shared_scales_clamp_and_bound():
    update = _update()
    layout = Layout.of(update)
    clipped, _ = clip_update(update, 1.0)
    safe = quantize(clipped, 16, np.random.default_rng(0), scales_from_bound(layout, 1.0, 16))
    assert safe.clamped == 0
    tight = quantize(update, 8, np.random.default_rng(0), scales_from_reference(update, 8, headroom=1.0))
    assert tight.clamped > 0
    assert update_norm(dequantize(tight)) <= update_norm(update) * 1.01


def test_norm_bound_holds_after_quantization():
    update, _ = clip_update(_update(), 0.5)
    for seed in range(5):
        qu = quantize(update, 8, np.random.default_rng(seed), norm_bound=0.5)
        assert update_norm(dequantize(qu)) <= 0.5


@pytest.mark.parametrize("bits, clients, expected", [(8, 1, 8), (8, 3, 16), (16, 3, 24), (16, 30, 24),
                                                     (16, 256, 24), (16, 257, 32)])
def test_ring_bits(bits, clients, expected):
    assert ring_bits(bits, clients) == expected


@pytest.mark.parametrize("bits, clients", [(8, 3), (16, 30), (16, 300)])
def test_ring_sum_of_extreme_values_is_exact(bits, clients):
    k = ring_bits(bits, clients)
    rng = np.random.default_rng(0)
    q = qmax(bits)
    ints = [rng.choice([-q, q, 0, 1, -1], size=1000) for _ in range(clients)]
    ints[0][:] = -q  # the worst case: every client at the same extreme
    for i in range(1, clients):
        ints[i][:10] = -q
    total = to_ring(ints[0], k)
    for v in ints[1:]:
        total = ring_add(total, to_ring(v, k), k)
    np.testing.assert_array_equal(from_ring(total, k), np.sum(ints, axis=0))


@pytest.mark.parametrize("k", [8, 16, 24, 32, 40, 64])
def test_pack_unpack_ring_is_exact(k):
    rng = np.random.default_rng(k)
    values = to_ring(rng.integers(-(2 ** 40), 2 ** 40, 777), k)
    blob = pack_ring(values, k)
    assert len(blob) == 777 * k // 8
    np.testing.assert_array_equal(unpack_ring(blob, k), values)


def test_dequantize_a_sum_divides_like_fedavg():
    a, b = _update(1), _update(2)
    layout = Layout.of(a)
    scales = scales_from_bound(layout, max(update_norm(a), update_norm(b)), 16)
    qa, qb = (quantize(u, 16, np.random.default_rng(i), scales) for i, u in enumerate((a, b)))
    mean = dequantize_values(qa.values.astype(np.int64) + qb.values, layout, scales)
    for k in a:
        np.testing.assert_allclose(mean[k] / 2, (a[k] + b[k]) / 2, atol=scales[0])


def test_client_dp_noise_has_the_calibrated_std():
    total = {"w": np.zeros(200_000, np.float32)}
    noisy = add_client_dp_noise(total, clip=0.5, noise_multiplier=1.2, rng=np.random.default_rng(0))
    assert np.std(noisy["w"]) == pytest.approx(0.6, rel=0.02)
