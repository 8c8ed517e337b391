"""What a hospital's update becomes before it is sealed, and how the aggregator turns opened updates back into sums.

Hospital, in order (README.md, "Updates on the wire"):
    Δ = local − global → clip (update_clip, or client_clip under client-level DP) → quantize (stochastic rounding,
    8/16 bit) → [secure aggregation: × integer weight n_k, into Z_2^k, + pairwise and self masks] → AES-256-GCM
    (associated data: version, run, round, hospital, SHA-256 of the global model it was computed from; the last
    step is :mod:`medsyngan.federated.transport`'s).
Aggregator, in reverse:
    decrypt → [sum masked vectors, unmask] → dequantize → divide by the total weight → (client-level DP: add
    N(0, σ²C²) to the sum and divide by the fixed number of participants) → mean update for the server optimizer.

Without secure aggregation the server weights each decoded update by its hospital's image count itself; with it,
weights must be integers applied before masking, so the sum is exact in the ring.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save

from medsyngan.config import PrivacySection
from medsyngan.errors import UserError
from medsyngan.federated.plan import derive_seed
from medsyngan.privacy import codec

State = dict[str, torch.Tensor]
#: Under client-level DP, a shared quantization range of this many times the RMS of an update at the clip norm.
CLIENT_DP_RANGE = 4.0


def check_settings(privacy: PrivacySection) -> None:
    if privacy.secagg and privacy.quantize_bits == 0:
        raise UserError("privacy.secagg adds integers: set privacy.quantize_bits = 8 or 16")


def uses_bytes(privacy: PrivacySection) -> bool:
    """Whether an update travels as one opaque byte string (anything beyond plain float32 tensors)."""
    return bool(privacy.quantize_bits or privacy.encrypt or privacy.secagg)


@dataclass
class Encoded:
    payload: bytes | State
    weight: float
    stats: dict[str, float]


def _to_numpy(update: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().to(torch.float32).numpy() for k, v in update.items()}


def hospital_weight(privacy: PrivacySection, num_examples: int) -> int:
    """FedAvg weighs by training images; client-level DP needs equal weights (bounded sensitivity)."""
    return 1 if privacy.client_dp else int(num_examples)


def encode_update(
    update: Mapping[str, torch.Tensor],
    num_examples: int,
    privacy: PrivacySection,
    *,
    seed: int,
    hospital: int,
    round_: int,
    scales: np.ndarray | None = None,
    ring_bits: int | None = None,
    masker=None,
) -> Encoded:
    """Clip, quantize and (with ``masker``, a SecAggClient after key sharing) mask one hospital's update.

    ``masker`` is a callable ``ring_vector -> masked ring_vector``; encryption is applied by the caller, which
    holds the session keys.
    """
    arrays = _to_numpy(update)
    stats: dict[str, float] = {"update_norm": codec.update_norm(arrays)}
    clip = privacy.client_clip if privacy.client_dp else privacy.update_clip
    if clip > 0:
        arrays, _ = codec.clip_update(arrays, clip)
    weight = hospital_weight(privacy, num_examples)
    bits = privacy.quantize_bits
    if not bits:
        payload: bytes | State = np_save(arrays) if uses_bytes(privacy) else {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        return Encoded(payload, weight, stats)
    # Seeded per (run, hospital, round) so that a resumed federation rounds exactly as the original did.
    rng = np.random.default_rng(derive_seed(seed, "quantize", hospital, round_))
    bound = privacy.client_clip if privacy.client_dp else None
    quantized = codec.quantize(arrays, bits, rng, scales=scales if privacy.secagg else None, norm_bound=bound)
    stats["clamped"] = float(quantized.clamped)
    if not privacy.secagg:
        return Encoded(codec.encode(quantized, privacy.compression), weight, stats)
    if masker is None or ring_bits is None:
        raise ValueError("secure aggregation needs the round's masker and ring size")
    weighted = quantized.values.astype(np.int64) * weight
    masked = masker(codec.to_ring(weighted, ring_bits))
    return Encoded(codec.pack_ring(masked, ring_bits), weight, stats)


def decode_update(payload: bytes | State, privacy: PrivacySection) -> dict[str, np.ndarray]:
    """One hospital's (decrypted) update without secure aggregation, as float arrays."""
    if not uses_bytes(privacy):
        return {k: v.numpy() for k, v in payload.items()}  # type: ignore[union-attr]
    assert isinstance(payload, bytes)
    try:
        if privacy.quantize_bits:
            return codec.dequantize(codec.decode(payload))
        return np_load(payload)
    except Exception as exc:  # noqa: BLE001 - a malformed update is one clear refusal, whatever broke
        raise ValueError(f"malformed update ({exc})") from None


def secagg_ring_bits(bits: int, weights_total: int) -> int:
    """Ring size for Σ n_k q_k: |Σ| ≤ qmax · Σ n_k, so k = bits + ceil(log2 Σ n_k), in whole bytes."""
    return codec.ring_bits(bits, max(2, weights_total))


def shared_scales(
    privacy: PrivacySection, layout_reference: Mapping[str, np.ndarray], previous_mean: Mapping[str, np.ndarray] | None,
    adam_bound: float,
) -> np.ndarray:
    """Per-tensor quantization scales that every hospital of a secure-aggregation round must share.

    From round 2 on they follow the previous round's mean update (public: the change of the global model) with
    4× headroom. In round 1 nothing public describes an update yet; the clipping bound is used when one is set,
    else ``adam_bound``: Adam moves a weight by about lr per step, so K local steps move it by at most ≈ K·lr.
    Coordinates beyond the range are clamped, which only shrinks an update (counted per hospital).

    Under client-level DP no scale exceeds :data:`CLIENT_DP_RANGE` × C/√d (d coordinates) over the code range:
    stochastic rounding adds about d·s²/4 to an update's squared norm, and at C/qmax per coordinate (the bound) or
    at the previous mean's range (mostly the server's noise) that is many times C², so no redraw of the rounding
    could keep the quantized update within the clip its noise is calibrated for. At this cap it adds at most
    (CLIENT_DP_RANGE/qmax)²·C²/4.
    """
    bits = privacy.quantize_bits
    layout = codec.Layout.of(layout_reference)
    if previous_mean is not None:
        scales = codec.scales_from_reference(previous_mean, bits)
    else:
        clip = privacy.client_clip if privacy.client_dp else privacy.update_clip
        scales = codec.scales_from_bound(layout, clip if clip > 0 else adam_bound, bits)
    if privacy.client_dp:
        cap = codec.scales_from_bound(layout, CLIENT_DP_RANGE * privacy.client_clip / math.sqrt(layout.size), bits)
        scales = np.minimum(scales, cap)
    return scales


def read_masked(payload: bytes, ring_bits: int, length: int) -> np.ndarray:
    """One hospital's masked ring vector; ValueError when the payload is not ``length`` ring elements."""
    try:
        masked = codec.unpack_ring(payload, ring_bits)
    except ValueError as exc:
        raise ValueError(f"malformed masked update ({exc})") from None
    if masked.shape != (length,):
        raise ValueError(f"masked update holds {masked.size} values, the round has {length}")
    return masked


def dequantize_sum(total: np.ndarray, ring_bits: int, layout_reference: Mapping[str, np.ndarray],
                   scales: np.ndarray) -> dict[str, np.ndarray]:
    """The unmasked ring sum Σ n_k q_k back to Σ n_k Δ_k in floats (exact integers, then one scale per tensor)."""
    return codec.dequantize_values(codec.from_ring(total, ring_bits), codec.Layout.of(layout_reference), scales)
