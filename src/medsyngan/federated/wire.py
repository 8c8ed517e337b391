"""What a hospital's update becomes on the wire, and how the aggregator turns replies back into one mean update.

Hospital, in order (DESIGN.md "What a hospital sends"):
    Δ = local − global → clip (update_clip, or client_clip under client-level DP) → quantize (stochastic rounding,
    8/16 bit) → [secure aggregation: × integer weight n_k, into Z_2^k, + pairwise and self masks] → AES-256-GCM
    (associated data: version, run, round, hospital, SHA-256 of the global model it was computed from).
Aggregator, in reverse:
    decrypt → [sum masked vectors, unmask] → dequantize → divide by the total weight → (client-level DP: add
    N(0, σ²C²) to the sum and divide by the fixed number of participants) → mean update for the server optimizer.

Without secure aggregation the server weights each decoded update by its hospital's image count itself; with it,
weights must be integers applied before masking, so the sum is exact in the ring.
"""

from __future__ import annotations

import hashlib
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


def model_hash(state: Mapping[str, torch.Tensor]) -> bytes:
    """SHA-256 of a set of tensors in key order: what an encrypted update is bound to."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode() + b"\0")
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()


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
    """
    bits = privacy.quantize_bits
    if previous_mean is not None:
        return codec.scales_from_reference(previous_mean, bits)
    clip = privacy.client_clip if privacy.client_dp else privacy.update_clip
    layout = codec.Layout.of(layout_reference)
    return codec.scales_from_bound(layout, clip if clip > 0 else adam_bound, bits)


def aggregator_identity(job: Mapping, pinned_path: str | None):
    """The aggregator's identity key as this hospital trusts it: the pinned file from `pki init` when the node has
    one (a relay cannot substitute it), else the key announced in the job (simulation, one machine)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    from medsyngan.privacy.crypto import load_public_key

    if pinned_path:
        pinned = load_public_key(pinned_path)
        announced = job.get("aggregator_public")
        if announced is not None and bytes(announced) != pinned.public_bytes_raw():
            raise UserError(f"the aggregator announced a key that differs from the pinned {pinned_path}; refusing "
                            "to send updates (check that this node talks to the right SuperLink)")
        return pinned
    if "aggregator_public" not in job:
        raise UserError("updates must be encrypted but no aggregator key is known; set aggregator-public in "
                        "--node-config to the file from `medsyngan pki init`")
    return X25519PublicKey.from_public_bytes(bytes(job["aggregator_public"]))


def seal_update(payload: bytes, job: Mapping, hospital: int, round_: int, global_hash: bytes,
                pinned_path: str | None = None) -> bytes:
    """AES-256-GCM to the aggregator: its identity key and this round's key, with a fresh session key."""
    from medsyngan.privacy.crypto import HospitalSession

    identity = aggregator_identity(job, pinned_path)
    session = HospitalSession(identity, str(job["run_id"]), str(hospital), round_, bytes(job["round_public"]))
    return session.seal(payload, global_hash)


class Transport:
    """The aggregator's end of the update encryption: round keys out, sealed updates in (or plain passthrough)."""

    def __init__(self, privacy: PrivacySection, run_id: str, identity_key_path: str | None):
        self.privacy = privacy
        self.aggregator = None
        if privacy.encrypt:
            from medsyngan.privacy.crypto import Aggregator, load_identity_key

            if identity_key_path is None:
                raise UserError("privacy.encrypt needs the aggregator's identity key (medsyngan pki init writes it)")
            self.aggregator = Aggregator(load_identity_key(identity_key_path), run_id)

    @property
    def identity_public(self) -> bytes | None:
        return self.aggregator.identity_public if self.aggregator is not None else None

    def round_terms(self, round_: int) -> dict:
        return {"round_public": self.aggregator.round_public(round_)} if self.aggregator is not None else {}

    def open(self, payload: bytes | State, hospital: int, round_: int, global_hash: bytes) -> bytes | State:
        if self.aggregator is None:
            return payload
        assert isinstance(payload, bytes)
        return self.aggregator.open(payload, hospital_id=str(hospital), round_=round_, global_model_hash=global_hash)

    def close_round(self, round_: int) -> None:
        if self.aggregator is not None:
            self.aggregator.close_round(round_)


# --- secure aggregation records: what each stage carries, in Flower ConfigRecord-friendly types ------------

def secagg_terms(config, scales: np.ndarray) -> dict:
    """The round's public secure-aggregation parameters, sent with every stage's instruction."""
    return {
        "secagg_ids": list(config.ids), "secagg_threshold": config.threshold, "secagg_ring_bits": config.ring_bits,
        "secagg_length": config.length, "secagg_neighbours": config.neighbours,
        "secagg_context": config.context, "secagg_scales": [float(x) for x in scales],
    }


def secagg_config(job: Mapping):
    from medsyngan.privacy.secagg import SecAggConfig

    return SecAggConfig(ids=tuple(int(i) for i in job["secagg_ids"]), threshold=int(job["secagg_threshold"]),
                        ring_bits=int(job["secagg_ring_bits"]), length=int(job["secagg_length"]),
                        neighbours=int(job["secagg_neighbours"]), context=bytes(job["secagg_context"]))


def advert_record(advert) -> dict:
    return {"cipher_public": advert.cipher_public, "mask_public": advert.mask_public}


def read_advert(content) -> object:
    from medsyngan.privacy.secagg import KeyAdvert

    record = content["secagg"]
    return KeyAdvert(bytes(record["cipher_public"]), bytes(record["mask_public"]))


def adverts_record(adverts: Mapping) -> dict:
    ids = sorted(adverts)
    return {"advert_ids": ids, "advert_cipher": [adverts[i].cipher_public for i in ids],
            "advert_mask": [adverts[i].mask_public for i in ids]}


def read_adverts(job: Mapping) -> dict:
    from medsyngan.privacy.secagg import KeyAdvert

    return {int(i): KeyAdvert(bytes(c), bytes(m))
            for i, c, m in zip(job["advert_ids"], job["advert_cipher"], job["advert_mask"])}


def shares_record(shares: Mapping[int, bytes]) -> dict:
    ids = sorted(shares)
    return {"share_to": ids, "share_ct": [shares[i] for i in ids]}


def read_shares(content) -> dict[int, bytes]:
    record = content["secagg"]
    return {int(i): bytes(c) for i, c in zip(record["share_to"], record["share_ct"])}


def inbox_record(inbox: Mapping[int, bytes]) -> dict:
    ids = sorted(inbox)
    return {"inbox_from": ids, "inbox_ct": [inbox[i] for i in ids]}


def read_inbox(job: Mapping) -> dict[int, bytes]:
    return {int(i): bytes(c) for i, c in zip(job["inbox_from"], job["inbox_ct"])}


SHARE_BYTES = 66  # a GF(2^521 − 1) element, as secagg.SHARE_BYTES


def reveals_record(reveals: Mapping[int, tuple[str, int]]) -> dict:
    ids = sorted(reveals)
    return {"reveal_peer": ids, "reveal_kind": [reveals[i][0] for i in ids],
            "reveal_share": [reveals[i][1].to_bytes(SHARE_BYTES, "big") for i in ids]}


def read_reveals(content) -> dict[int, tuple[str, int]]:
    record = content["secagg"]
    return {int(p): (str(k), int.from_bytes(bytes(s), "big"))
            for p, k, s in zip(record["reveal_peer"], record["reveal_kind"], record["reveal_share"])}


def read_masked(payload: bytes, ring_bits: int) -> np.ndarray:
    return codec.unpack_ring(payload, ring_bits)


def dequantize_sum(total: np.ndarray, ring_bits: int, layout_reference: Mapping[str, np.ndarray],
                   scales: np.ndarray) -> dict[str, np.ndarray]:
    """The unmasked ring sum Σ n_k q_k back to Σ n_k Δ_k in floats (exact integers, then one scale per tensor)."""
    return codec.dequantize_values(codec.from_ring(total, ring_bits), codec.Layout.of(layout_reference), scales)
