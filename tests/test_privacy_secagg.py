"""Secure aggregation: the unmasked sum is exact under dropouts at every stage, and a masked vector is noise."""

import itertools
import os

import numpy as np
import pytest
from scipy import stats

from medsyngan.privacy.codec import from_ring, pack_ring, qmax, ring_bits, to_ring
from medsyngan.privacy.secagg import (
    SecAggAbort,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    neighbour_graph,
    shamir_combine,
    shamir_split,
    simulate,
    threshold_for,
)

LENGTH = 2000


def _config(n=5, threshold=3, neighbours=0, length=LENGTH, bits=16):
    return SecAggConfig(tuple(range(1, n + 1)), threshold, ring_bits(bits, n), length, neighbours, b"run-7/round-2")


def _inputs(config, bits=16, seed=0):
    rng = np.random.default_rng(seed)
    q = qmax(bits)
    ints = {u: rng.integers(-q, q + 1, config.length) for u in config.ids}
    return ints, {u: to_ring(v, config.ring_bits) for u, v in ints.items()}


def test_shamir_any_threshold_subset_rebuilds_the_secret():
    secret = os.urandom(32)
    shares = shamir_split(secret, 3, range(1, 6))
    for subset in itertools.combinations(shares, 3):
        assert shamir_combine({i: shares[i] for i in subset}, 3) == secret
    # A secret of all 0xff bytes is the largest one the field must hold.
    top = b"\xff" * 32
    assert shamir_combine(shamir_split(top, 2, [4, 9]), 2) == top
    with pytest.raises(SecAggAbort):
        shamir_combine({1: shares[1], 2: shares[2]}, 3)


def test_shamir_shares_lie_on_a_polynomial_of_degree_threshold_minus_one():
    # Independent check of the interpolation: shares from a degree-1 polynomial (t = 2) are collinear mod p,
    # so the share at x = 3 follows from those at 1 and 2 as 2·f(2) - f(1).
    from medsyngan.privacy.secagg import FIELD_PRIME

    shares = shamir_split(os.urandom(32), 2, [1, 2, 3])
    assert shares[3] == (2 * shares[2] - shares[1]) % FIELD_PRIME
    assert (2 * shares[1] - shares[2]) % FIELD_PRIME < 2 ** 256  # f(0), the secret


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("dropouts", [0, 1, 2])  # 2 = n - threshold, the most the round tolerates
def test_sum_is_exact_with_dropouts_after_each_stage(stage, dropouts):
    config = _config(n=5, threshold=3)
    ints, inputs = _inputs(config)
    dropped = set(range(2, 2 + dropouts))
    trace = simulate(config, inputs, {stage: dropped})
    # Dropouts before the masked input are left out of the sum; after it, their input is in the sum.
    expected_members = set(config.ids) - dropped if stage < 2 else set(config.ids)
    assert trace.survivors == frozenset(expected_members)
    expected = np.sum([ints[u] for u in sorted(expected_members)], axis=0)
    np.testing.assert_array_equal(from_ring(trace.total, config.ring_bits), expected)


def test_sum_is_exact_with_dropouts_spread_over_stages():
    config = _config(n=7, threshold=4)
    ints, inputs = _inputs(config, seed=3)
    trace = simulate(config, inputs, {0: {1}, 1: {4}, 2: {7}})
    expected = np.sum([ints[u] for u in (2, 3, 5, 6, 7)], axis=0)
    np.testing.assert_array_equal(from_ring(trace.total, config.ring_bits), expected)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_fewer_than_threshold_survivors_abort_clearly(stage):
    config = _config(n=5, threshold=3)
    _, inputs = _inputs(config)
    with pytest.raises(SecAggAbort, match="fewer than the threshold 3"):
        simulate(config, inputs, {stage: {1, 2, 3}})


def test_one_masked_vector_is_uniform():
    # The input is all zeros — as far from uniform as it gets — yet the masked vector must be uniform on the
    # ring: chi-square on its bytes and Kolmogorov–Smirnov on its values / 2^k.
    config = _config(n=3, threshold=2, length=50_000)
    clients = {u: SecAggClient(u, config) for u in config.ids}
    server = SecAggServer(config)
    keys = server.collect_adverts({u: c.advertise() for u, c in clients.items()})
    inbox = server.route_shares({u: c.share_keys(keys) for u, c in clients.items()})
    zeros = np.zeros(config.length, np.uint32)
    masked = clients[1].masked_input(zeros, inbox[1])
    k = config.ring_bits
    counts = np.bincount(np.frombuffer(pack_ring(masked, k), np.uint8), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4
    assert stats.kstest(masked / 2.0 ** k, "uniform").pvalue > 1e-4
    # The same tests do reject a structured vector (quantized Gaussian values), so they can fail.
    plain = to_ring(np.random.default_rng(0).normal(0, 300, config.length).astype(np.int64), k)
    plain_counts = np.bincount(np.frombuffer(pack_ring(plain, k), np.uint8), minlength=256)
    assert stats.chisquare(plain_counts).pvalue < 1e-6


def test_sparse_graph_is_regular_symmetric_connected_and_seeded():
    ids = list(range(1, 31))
    graph = neighbour_graph(ids, 6, b"seed")
    assert graph == neighbour_graph(ids, 6, b"seed")
    assert graph != neighbour_graph(ids, 6, b"other seed")
    assert all(len(vs) == 6 and u not in vs for u, vs in graph.items())
    assert all(u in graph[v] for u, vs in graph.items() for v in vs)
    seen, frontier = {1}, [1]
    while frontier:
        frontier = [v for u in frontier for v in graph[u] if v not in seen]
        seen.update(frontier)
    assert seen == set(ids)
    assert all(len(vs) == 29 for vs in neighbour_graph(ids, 0, b"seed").values())


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_sparse_graph_sum_is_exact_with_dropouts(stage):
    config = _config(n=12, threshold=3, neighbours=4)
    ints, inputs = _inputs(config, seed=stage)
    dropped = {3, 8}
    trace = simulate(config, inputs, {stage: dropped})
    members = sorted(trace.survivors)
    assert set(members) == (set(config.ids) - dropped if stage < 2 else set(config.ids))
    np.testing.assert_array_equal(from_ring(trace.total, config.ring_bits),
                                  np.sum([ints[u] for u in members], axis=0))
    # Each client only talks to its neighbours: far fewer share ciphertexts than the complete graph.
    assert trace.bytes_up["share"] < simulate(_config(n=12, threshold=7), inputs).bytes_up["share"] / 2


def test_a_client_never_reveals_both_shares():
    config = _config(n=3, threshold=2)
    clients = {u: SecAggClient(u, config) for u in config.ids}
    server = SecAggServer(config)
    keys = server.collect_adverts({u: c.advertise() for u, c in clients.items()})
    inbox = server.route_shares({u: c.share_keys(keys) for u, c in clients.items()})
    _, inputs = _inputs(config)
    for u in config.ids:
        clients[u].masked_input(inputs[u], inbox[u])
    reveal = clients[1].unmask({1, 2, 3})
    assert {kind for kind, _ in reveal.values()} == {"b"}
    with pytest.raises(SecAggAbort, match="already revealed"):
        clients[1].unmask({1, 2})  # a second list claiming 3 dropped would expose 3's mask key
    with pytest.raises(SecAggAbort, match="omits this client"):
        clients[2].unmask({1, 3})


def test_configuration_is_validated():
    with pytest.raises(ValueError, match="strict majority"):
        _config(n=6, threshold=3)
    with pytest.raises(ValueError, match="at least 2 clients"):
        SecAggConfig((1,), 1, 24, 10)
    assert threshold_for(0.66, 3) == 2 and threshold_for(0.66, 10) == 7 and threshold_for(0.1, 10) == 6


def test_wire_pipeline_composes_clip_quantize_secagg_encrypt():
    # Hospital side: clip → quantize with shared scales → ring; the server gets the exact integer sum, which
    # dequantizes to the mean of the clipped float updates within the quantization step.
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from medsyngan.privacy.codec import (Layout, clip_update, dequantize_values, quantize, scales_from_bound,
                                         unpack_ring)
    from medsyngan.privacy.crypto import HospitalSession, UpdateReceiver, serialized_model_hash

    rng = np.random.default_rng(0)
    updates = {u: {"G.w": rng.normal(0, 0.1, (30, 20)), "D.b": rng.normal(0, 0.5, (50,))} for u in (1, 2, 3, 4)}
    clipped = {u: clip_update(upd, 1.0)[0] for u, upd in updates.items()}
    layout = Layout.of(clipped[1])
    scales = scales_from_bound(layout, 1.0, 16)
    quantized = {u: quantize(c, 16, np.random.default_rng(u), scales) for u, c in clipped.items()}
    config = SecAggConfig((1, 2, 3, 4), 3, ring_bits(16, 4), layout.size, 0, b"run/1")
    trace = simulate(config, {u: to_ring(q.values, config.ring_bits) for u, q in quantized.items()})
    mean = dequantize_values(from_ring(trace.total, config.ring_bits), layout, scales)
    for name in layout.names:
        expected = np.mean([clipped[u][name] for u in clipped], axis=0)
        assert np.max(np.abs(mean[name] / 4 - expected)) <= scales[0]

    # A packed masked vector travels encrypted and comes back bit-identical.
    identity = X25519PrivateKey.generate()
    agg = UpdateReceiver(identity, "run")
    digest = serialized_model_hash(b"global")
    y = to_ring(quantized[1].values, config.ring_bits)
    sealed = HospitalSession(identity.public_key(), "run", "1", 1, agg.round_public(1)).seal(
        pack_ring(y, config.ring_bits), digest)
    opened = agg.open(sealed, hospital_id="1", round_=1, global_model_hash=digest)
    np.testing.assert_array_equal(unpack_ring(opened, config.ring_bits), y)


def test_client_state_survives_serialization_between_stages():
    # Flower may run each stage of a hospital in a fresh process: the client is rebuilt from bytes every time.
    config = _config(n=4, threshold=3)
    ints, inputs = _inputs(config, seed=9)
    states = {u: SecAggClient(u, config).to_bytes() for u in config.ids}

    def stage(u, method, *args):
        client = SecAggClient.from_bytes(states[u], config)
        result = getattr(client, method)(*args)
        states[u] = client.to_bytes()
        return result

    server = SecAggServer(config)
    keys = server.collect_adverts({u: stage(u, "advertise") for u in config.ids})
    inbox = server.route_shares({u: stage(u, "share_keys", keys) for u in config.ids})
    survivors = server.collect_masked({u: stage(u, "masked_input", inputs[u], inbox[u]) for u in (1, 2, 3)})
    total = server.unmask({u: stage(u, "unmask", survivors) for u in (1, 2, 3)})
    np.testing.assert_array_equal(from_ring(total, config.ring_bits), ints[1] + ints[2] + ints[3])
    with pytest.raises(SecAggAbort, match="already revealed"):
        stage(1, "unmask", survivors)
