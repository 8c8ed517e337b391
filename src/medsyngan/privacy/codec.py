"""What a hospital's model update looks like on the wire: clip → quantize → (ring for secure aggregation) → bytes.

An update is a mapping of tensor name → float array (numpy; torch tensors are converted by the caller with
``.numpy()``). The codec never imports torch, so the aggregator can run it without a GPU stack.

- :func:`clip_update` scales the whole update to an L2 norm (one norm over every tensor, as DP-FedAvg needs).
- :func:`quantize` maps each tensor to signed ``bits``-bit integers with a per-tensor scale and unbiased
  stochastic rounding (E[dequantize(quantize(x))] = x), so averaging many hospitals does not accumulate a bias.
- :func:`encode` / :func:`decode` turn a quantized update into compressed bytes and back (plain path, one
  hospital's own scales).
- :func:`to_ring` / :func:`from_ring` / :func:`pack_ring` map the integers into Z_{2^k} for secure aggregation,
  where k leaves room for the sum of every hospital without wrapping, so the unmasked sum is exact.
"""

from __future__ import annotations

import json
import lzma
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Literal, Mapping

import numpy as np

Update = Mapping[str, np.ndarray]
Compression = Literal["zlib", "lzma", "none"]
WIRE_MAGIC = b"MSGQ"
WIRE_VERSION = 1
_INT_DTYPES = {8: np.int8, 16: np.int16}


@dataclass(frozen=True)
class Layout:
    """Names and shapes in a fixed order: the flat vector's coordinates are the tensors concatenated."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def offsets(self) -> list[tuple[int, int]]:
        bounds = np.cumsum((0,) + self.sizes)
        return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def to_json(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_json(cls, obj: dict) -> "Layout":
        return cls(tuple(obj["names"]), tuple(tuple(int(d) for d in s) for s in obj["shapes"]))

    @classmethod
    def of(cls, update: Update) -> "Layout":
        names = tuple(sorted(update))
        return cls(names, tuple(tuple(np.shape(update[n])) for n in names))


def flatten(update: Update) -> tuple[np.ndarray, Layout]:
    layout = Layout.of(update)
    if not layout.names:
        return np.zeros(0, np.float64), layout
    return np.concatenate([np.asarray(update[n], np.float64).ravel() for n in layout.names]), layout


def unflatten(vector: np.ndarray, layout: Layout, dtype=np.float32) -> dict[str, np.ndarray]:
    if vector.size != layout.size:
        raise ValueError(f"vector has {vector.size} values; the layout needs {layout.size}")
    return {name: vector[a:b].reshape(shape).astype(dtype, copy=False)
            for name, shape, (a, b) in zip(layout.names, layout.shapes, layout.offsets())}


def update_norm(update: Update) -> float:
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(v, np.float64)))) for v in update.values()))


def clip_update(update: Update, max_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale the whole update so that its L2 norm is at most ``max_norm``; returns (clipped, norm before)."""
    if max_norm <= 0:
        raise ValueError("the clipping norm must be positive")
    norm = update_norm(update)
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: (np.asarray(v) * factor).astype(np.asarray(v).dtype, copy=False) for k, v in update.items()}, norm


def qmax(bits: int) -> int:
    """Largest integer magnitude of a signed ``bits``-bit code; the range is symmetric so that 0 maps to 0."""
    if bits not in _INT_DTYPES:
        raise ValueError(f"quantization supports 8 or 16 bits, not {bits}")
    return 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class QuantizedUpdate:
    layout: Layout
    bits: int
    scales: np.ndarray  # float64, one per tensor: value = integer × scale
    values: np.ndarray  # int8 / int16, the whole update flattened in layout order
    clamped: int = 0  # coordinates outside a shared scale's range that were clamped to it


def scales_for(update: Update, bits: int) -> np.ndarray:
    """Per-tensor scales that represent this update's own range exactly (plain path: one hospital's scales)."""
    layout = Layout.of(update)
    peak = np.array([float(np.max(np.abs(update[n]))) if np.size(update[n]) else 0.0 for n in layout.names])
    return np.where(peak > 0, peak / qmax(bits), 1.0)


def scales_from_bound(layout: Layout, max_norm: float, bits: int) -> np.ndarray:
    """Shared scales that no update clipped to ``max_norm`` can exceed (no coordinate is ever clamped).

    Secure aggregation adds integers, so every hospital must use the same scale per tensor, fixed before anyone
    sees the data. This bound is the safe choice; at 8 bits it is coarse (quantization noise grows with the
    number of coordinates), so 8-bit secure aggregation should use :func:`scales_from_reference`.
    """
    return np.full(len(layout.names), max_norm / qmax(bits), np.float64)


def scales_from_reference(reference: Update, bits: int, headroom: float = 4.0) -> np.ndarray:
    """Shared scales from a public reference update (e.g. the previous round's aggregate update).

    The range is ``headroom`` times the reference's RMS per tensor; coordinates beyond it are clamped (counted in
    ``QuantizedUpdate.clamped``). Clamping only shrinks a coordinate, so the update's norm (and DP sensitivity)
    never grows. The reference is public, so using it leaks nothing new.
    """
    layout = Layout.of(reference)
    rms = np.array([float(np.sqrt(np.mean(np.square(np.asarray(reference[n], np.float64)))))
                    if np.size(reference[n]) else 0.0 for n in layout.names])
    return np.where(rms > 0, headroom * rms / qmax(bits), 1.0)


def quantize(update: Update, bits: int, rng: np.random.Generator, scales: np.ndarray | None = None,
             norm_bound: float | None = None) -> QuantizedUpdate:
    """Stochastic rounding to signed integers: x/s = f + r with 0 ≤ r < 1 rounds up with probability r.

    ``scales`` defaults to the update's own per-tensor range. ``norm_bound`` (client-level DP) redraws the
    rounding until the dequantized update's norm is at most the bound, because DP's noise is calibrated to that
    norm and stochastic rounding can push a clipped update slightly past it; if redraws do not get there the
    input is shrunk by 1 % and rounded again (a rare, deterministic fallback that keeps the bound exact).
    """
    q = qmax(bits)
    vector, layout = flatten(update)
    if scales is None:
        scales = scales_for(update, bits)
    scales = np.asarray(scales, np.float64)
    if scales.shape != (len(layout.names),) or np.any(scales <= 0):
        raise ValueError(f"need {len(layout.names)} positive scales, got shape {scales.shape}")
    per_coord = np.repeat(scales, layout.sizes)
    scaled = vector / per_coord
    clamped = int(np.count_nonzero(np.abs(scaled) > q))
    scaled = np.clip(scaled, -q, q)
    for attempt in range(64):
        floor = np.floor(scaled)
        ints = floor + (rng.random(scaled.shape) < (scaled - floor))
        if norm_bound is None or float(np.linalg.norm(ints * per_coord)) <= norm_bound:
            break
        if attempt % 8 == 7:
            scaled *= 0.99
    else:
        raise RuntimeError(f"could not quantize within norm {norm_bound}; is the update clipped to it?")
    return QuantizedUpdate(layout, bits, scales, ints.astype(_INT_DTYPES[bits]), clamped)


def dequantize_values(values: np.ndarray, layout: Layout, scales: np.ndarray) -> dict[str, np.ndarray]:
    """Integers (one hospital's, or a secure-aggregation sum) back to float32 tensors."""
    return unflatten(values.astype(np.float64) * np.repeat(np.asarray(scales, np.float64), layout.sizes), layout)


def dequantize(qu: QuantizedUpdate) -> dict[str, np.ndarray]:
    return dequantize_values(qu.values, qu.layout, qu.scales)


def _compress(data: bytes, compression: Compression) -> bytes:
    if compression == "zlib":
        return zlib.compress(data, 6)
    if compression == "lzma":
        return lzma.compress(data, preset=1)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression '{compression}'; use zlib, lzma or none")


def _decompress(data: bytes, compression: str) -> bytes:
    return {"zlib": zlib.decompress, "lzma": lzma.decompress, "none": bytes}[compression](data)


def encode(qu: QuantizedUpdate, compression: Compression = "zlib") -> bytes:
    """magic | version | header length | JSON header (layout, bits, scales, codec) | compressed integers."""
    header = json.dumps({
        "layout": qu.layout.to_json(), "bits": qu.bits, "scales": qu.scales.tolist(),
        "compression": compression,
    }).encode()
    payload = _compress(qu.values.astype(qu.values.dtype.newbyteorder("<"), copy=False).tobytes(), compression)
    return WIRE_MAGIC + struct.pack("<BI", WIRE_VERSION, len(header)) + header + payload


def decode(data: bytes) -> QuantizedUpdate:
    if data[:4] != WIRE_MAGIC:
        raise ValueError("not an encoded MedSynGAN update (bad magic)")
    version, hlen = struct.unpack_from("<BI", data, 4)
    if version != WIRE_VERSION:
        raise ValueError(f"encoded update has wire version {version}; this build reads {WIRE_VERSION}")
    start = 4 + struct.calcsize("<BI")
    header = json.loads(data[start:start + hlen])
    layout, bits = Layout.from_json(header["layout"]), int(header["bits"])
    raw = _decompress(data[start + hlen:], header["compression"])
    values = np.frombuffer(raw, np.dtype(_INT_DTYPES[bits]).newbyteorder("<")).astype(_INT_DTYPES[bits])
    if values.size != layout.size:
        raise ValueError(f"encoded update holds {values.size} values; its layout needs {layout.size}")
    return QuantizedUpdate(layout, bits, np.asarray(header["scales"], np.float64), values)


@dataclass(frozen=True)
class WireStats:
    float32_bytes: int
    quantized_bytes: int
    encoded_bytes: int

    @property
    def ratio(self) -> float:
        """float32 bytes ÷ encoded bytes: how many times smaller the update travels."""
        return self.float32_bytes / self.encoded_bytes


def wire_stats(qu: QuantizedUpdate, encoded: bytes) -> WireStats:
    return WireStats(4 * qu.layout.size, qu.values.nbytes, len(encoded))


# --- the ring Z_{2^k} of secure aggregation ---------------------------------------------------------------

def ring_bits(bits: int, max_clients: int) -> int:
    """k = bits + ceil(log2(max_clients)), rounded up to whole bytes.

    The sum of N signed values of magnitude ≤ 2^(bits-1) - 1 has magnitude < 2^(bits-1+ceil(log2 N)), which
    fits the signed range [-2^(k-1), 2^(k-1)) of the ring. Whole bytes cost nothing on the wire (values travel
    as ceil(k/8) bytes anyway) and make the masks uniform over every byte.
    """
    qmax(bits)
    if max_clients < 1:
        raise ValueError("max_clients must be at least 1")
    k = bits + math.ceil(math.log2(max_clients))
    return 8 * math.ceil(k / 8)


def ring_dtype(k: int) -> type:
    if not 8 <= k <= 64 or k % 8:
        raise ValueError(f"ring bits must be a multiple of 8 in [8, 64], not {k}")
    return np.uint32 if k <= 32 else np.uint64


def ring_mask(k: int) -> int:
    return (1 << k) - 1


def to_ring(values: np.ndarray, k: int) -> np.ndarray:
    """Signed integers → their residues mod 2^k (two's complement), in uint32/uint64."""
    dtype = ring_dtype(k)
    return (values.astype(np.int64).astype(np.uint64) & np.uint64(ring_mask(k))).astype(dtype)


def from_ring(residues: np.ndarray, k: int) -> np.ndarray:
    """Residues mod 2^k → the signed representative in [-2^(k-1), 2^(k-1)), as int64."""
    r = residues.astype(np.uint64) & np.uint64(ring_mask(k))
    signed = r.astype(np.int64)
    if k == 64:
        return signed
    return np.where(r >= np.uint64(1 << (k - 1)), signed - (1 << k), signed)


def ring_add(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """(a + b) mod 2^k; uint arithmetic wraps mod 2^32 or 2^64, which 2^k divides."""
    return (a + b) & a.dtype.type(ring_mask(k))


def pack_ring(residues: np.ndarray, k: int) -> bytes:
    """k/8 little-endian bytes per value (24-bit values take 3 bytes, not 4)."""
    width = k // 8
    full = residues.astype(np.dtype(ring_dtype(k)).newbyteorder("<"), copy=False)
    itemsize = full.dtype.itemsize
    if width == itemsize:
        return full.tobytes()
    return full.view(np.uint8).reshape(-1, itemsize)[:, :width].tobytes()


def unpack_ring(data: bytes, k: int) -> np.ndarray:
    width = k // 8
    dtype = np.dtype(ring_dtype(k)).newbyteorder("<")
    if len(data) % width:
        raise ValueError(f"{len(data)} bytes is not a whole number of {k}-bit values")
    if width == dtype.itemsize:
        return np.frombuffer(data, dtype).astype(ring_dtype(k))
    raw = np.frombuffer(data, np.uint8).reshape(-1, width)
    full = np.zeros((raw.shape[0], dtype.itemsize), np.uint8)
    full[:, :width] = raw
    return full.view(dtype).ravel().astype(ring_dtype(k))


def add_client_dp_noise(total: Update, clip: float, noise_multiplier: float,
                        rng: np.random.Generator) -> dict[str, np.ndarray]:
    """DP-FedAvg's Gaussian mechanism: N(0, (σ·C)²) on every coordinate of the SUM of clipped updates.

    Replacing one hospital moves a sum of updates each clipped to C by at most 2C, the replace-one sensitivity
    that :func:`~medsyngan.privacy.accounting.client_level_accountant` counts for this noise.
    Divide by the number of hospitals after adding it, not before; weights must not depend on a hospital's data
    size, or the sensitivity grows with the largest weight.
    """
    std = noise_multiplier * clip
    return {k: (np.asarray(v, np.float64) + rng.normal(0.0, std, np.shape(v))).astype(np.float32)
            for k, v in total.items()}
