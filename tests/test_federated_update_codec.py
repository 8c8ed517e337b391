"""The update path without Flower: quantized, masked and sealed updates decode to the right aggregate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsyngan.config import PrivacySection
from medsyngan.federated import update_codec
from medsyngan.federated.protocol import Job, RoundInstruction
from medsyngan.federated.transport import AggregatorTransport, seal_update, tensors_hash
from medsyngan.federated.plan import derive_seed
from medsyngan.federated.aggregation import accumulate, mean_of
from medsyngan.privacy import codec
from medsyngan.privacy.crypto import IntegrityError, write_identity_key
from medsyngan.privacy.secagg import SecAggClient, SecAggConfig, SecAggServer


def _updates(n: int = 3) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [{"G.w": torch.randn(40, 7, generator=gen) * 0.01, "D.b": torch.randn(9, generator=gen) * 0.01}
            for _ in range(n)]


def test_quantized_update_round_trip_is_close_and_smaller():
    privacy = PrivacySection(quantize_bits=8)
    update = _updates(1)[0]
    encoded = update_codec.encode_update(update, 10, privacy, seed=1, hospital=0, round_=1)
    assert isinstance(encoded.payload, bytes) and len(encoded.payload) < 4 * 289
    decoded = update_codec.decode_update(encoded.payload, privacy)
    for key, value in update.items():
        step = float(value.abs().max()) / codec.qmax(8)
        assert np.abs(decoded[key] - value.numpy()).max() <= step + 1e-9


def test_secure_aggregation_sum_equals_the_plain_quantized_sum():
    privacy = PrivacySection(quantize_bits=8, secagg=True)
    updates, counts = _updates(3), [5, 7, 11]
    arrays = {k: v.numpy() for k, v in updates[0].items()}
    scales = update_codec.shared_scales(privacy, arrays, {k: v.numpy() for k, v in updates[1].items()}, adam_bound=0.05)
    ring_bits = update_codec.secagg_ring_bits(8, sum(counts))
    config = SecAggConfig(ids=(1, 2, 3), threshold=2, ring_bits=ring_bits, length=289, context=b"run/1")
    clients = {u: SecAggClient(u, config) for u in config.ids}
    server = SecAggServer(config)
    adverts = server.collect_adverts({u: c.advertise() for u, c in clients.items()})
    inbox = server.route_shares({u: c.share_keys(adverts) for u, c in clients.items()})
    masked, plain = {}, {}
    for u, client in clients.items():
        enc = update_codec.encode_update(updates[u - 1], counts[u - 1], privacy, seed=1, hospital=u - 1, round_=1,
                                 scales=scales, ring_bits=ring_bits,
                                 masker=lambda x, c=client, u=u: c.masked_input(x, inbox[u]))
        masked[u] = update_codec.read_masked(enc.payload, ring_bits, 289)
        # The same quantization without masks: what the secure sum must reproduce exactly.
        rng = np.random.default_rng(derive_seed(1, "quantize", u - 1, 1))
        q = codec.quantize({k: v.numpy() for k, v in updates[u - 1].items()}, 8, rng, scales=scales)
        accumulate(plain, {k: torch.as_tensor(v) for k, v in codec.dequantize(q).items()}, counts[u - 1])
    survivors = server.collect_masked(masked)
    total = server.unmask({u: clients[u].unmask(survivors) for u in survivors})
    summed = update_codec.dequantize_sum(total, ring_bits, arrays, scales)
    for key in arrays:
        assert np.allclose(summed[key], plain[key].numpy(), rtol=0, atol=1e-5)
    mean = mean_of({k: torch.as_tensor(v, dtype=torch.float64) for k, v in summed.items()}, sum(counts))
    exact = mean_of({k: sum(c * u[k].double() for c, u in zip(counts, updates)) for k in arrays}, sum(counts))
    # Unbiased rounding: the mean is within one quantization step of the exact weighted mean.
    assert all(float((mean[k] - exact[k]).abs().max()) <= float(scales.max()) for k in arrays)


def test_sealed_update_opens_only_for_its_hospital_round_and_model(tmp_path):
    privacy = PrivacySection(quantize_bits=8, encrypt=True)
    key_path = tmp_path / "aggregator.key"
    public = write_identity_key(key_path)
    transport = AggregatorTransport(privacy, "run-1", str(key_path))
    assert transport.identity_public == public
    job = Job(config="", run_id="run-1", aggregator_public=public)
    round_ = RoundInstruction(4, 0, transport.round_public(4))
    update = _updates(1)[0]
    global_hash = tensors_hash(update)
    payload = update_codec.encode_update(update, 3, privacy, seed=0, hospital=2, round_=4).payload
    sealed = seal_update(payload, job, round_, 2, global_hash)
    assert transport.open(sealed, 2, 4, global_hash) == payload
    with pytest.raises(IntegrityError):
        transport.open(sealed, 2, 4, global_hash)  # replay
    other = seal_update(payload, job, round_, 2, global_hash)
    with pytest.raises(IntegrityError):
        transport.open(other, 1, 4, global_hash)  # misrouted
    tampered = bytearray(seal_update(payload, job, round_, 2, global_hash))
    tampered[-5] ^= 1
    with pytest.raises(IntegrityError):
        transport.open(bytes(tampered), 2, 4, global_hash)
    with pytest.raises(IntegrityError):
        transport.open(seal_update(payload, job, round_, 2, global_hash), 2, 4, b"\0" * 32)  # other model


def test_first_round_scales_come_from_the_clip_or_the_adam_step_bound():
    arrays = {"w": np.zeros((3, 3), np.float32), "b": np.zeros(2, np.float32)}
    clipped = update_codec.shared_scales(PrivacySection(quantize_bits=8, secagg=True, update_clip=2.0), arrays, None, 0.05)
    unclipped = update_codec.shared_scales(PrivacySection(quantize_bits=8, secagg=True), arrays, None, 0.05)
    assert np.allclose(clipped, 2.0 / codec.qmax(8)) and np.allclose(unclipped, 0.05 / codec.qmax(8))


def test_secure_aggregation_without_quantization_is_refused():
    from medsyngan.errors import UserError

    with pytest.raises(UserError, match="quantize_bits"):
        update_codec.check_settings(PrivacySection(secagg=True))


@pytest.mark.parametrize("round_", [1, 2])
def test_client_level_dp_updates_of_a_full_size_model_quantize_within_the_clip(round_):
    """Client-level DP + secure aggregation + 8 bits (the federated preset with client_dp): an update of millions
    of coordinates clipped to C must quantize to one whose norm is still ≤ C (the noise is calibrated to it). At a
    shared scale of C/127 per coordinate (round 1) or of the previous, noise-dominated mean (round 2), stochastic
    rounding alone added many times C² and the hospital died in round 1."""
    privacy = PrivacySection(quantize_bits=8, secagg=True, client_dp=True, client_clip=1.0, client_noise=1.0)
    gen = np.random.default_rng(0)
    layout = {"G.w": np.zeros((1000, 1500), np.float32), "D.w": np.zeros(500_000, np.float32)}
    previous = None
    if round_ == 2:  # the server's noisy mean of 3 hospitals: N(0, (σC/3)²) per coordinate
        previous = {k: gen.normal(0, 1 / 3, v.shape).astype(np.float32) for k, v in layout.items()}
    scales = update_codec.shared_scales(privacy, layout, previous, adam_bound=0.01)
    update = {k: torch.from_numpy(gen.normal(0, 1e-3, v.shape).astype(np.float32)) for k, v in layout.items()}
    ring = update_codec.secagg_ring_bits(8, 3)
    encoded = update_codec.encode_update(update, 100, privacy, seed=1, hospital=0, round_=round_, scales=scales,
                                         ring_bits=ring, masker=lambda vector: vector)
    values = codec.from_ring(codec.unpack_ring(encoded.payload, ring), ring)
    sent = codec.dequantize_values(values, codec.Layout.of(layout), scales)
    assert 0.9 < codec.update_norm(sent) <= privacy.client_clip
