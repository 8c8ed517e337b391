"""Secure aggregation (Bonawitz et al. 2017; SecAgg+, Bell et al. 2020): the server learns only the sum.

Transport-agnostic: clients and server exchange plain Python objects, and the federation maps each stage onto
one Flower message round. Inputs are vectors in Z_{2^k} (see :mod:`medsyngan.privacy.codec`, ``to_ring``).

Stage 0, advertise keys — every client u makes two X25519 key pairs: ``c_u`` encrypts the shares it sends
    through the server, ``s_u`` agrees pairwise mask seeds. The server broadcasts the public keys (set U1).
Stage 1, share keys — u draws a self-mask seed b_u and Shamir-shares b_u and the private s_u t-of-m among its
    neighbourhood (itself and its neighbours in the graph); each share travels AES-GCM-encrypted under a key
    agreed from c_u and c_v, so the server routes ciphertext only (senders: U2).
Stage 2, masked input — u sends y_u = x_u + PRG(b_u) + Σ_{v ∈ U2 ∩ N(u)} ±PRG(s_uv)  (mod 2^k), "+" when
    u < v, "-" when u > v, so pairwise masks cancel in the sum (senders: U3).
Stage 3, unmask — for each neighbour v it holds shares of, a survivor reveals v's b-share if v ∈ U3 or v's
    s-share if v dropped (U2 \\ U3), never both; the server rebuilds b_u of every survivor and s_v of every
    dropout from t shares, removes those masks and gets Σ_{u ∈ U3} x_u mod 2^k exactly.

The PRG is the ChaCha20 keystream (``cryptography``) keyed by a 256-bit seed, so masks are uniform over the ring
(Flower's SecAgg+ expands 32-bit seeds with NumPy's generator, flwr issue #7522). Shamir sharing works over the
prime field GF(2^521 - 1), large enough for 32-byte secrets.

Threat model: the server may deviate. A client reveals one share per peer, once per round, and the threshold is a
strict majority, so no split of the survivor list yields both secrets of one client; pairwise masks are derived
with the hash of the global model each client trained from (``binding``), so a server that sends one client
another model unmasks noise. Adverts are plain keys here: the federation signs them and checks every peer's
before stage 1 (:mod:`medsyngan.federated.advert_signing`, Bonawitz' signature step against a server that
substitutes keys). A coalition of the server with t − 1 clients of a neighbourhood can unmask a member.

About 490 lines: client, server and the in-process driver share the round's types and helpers and are read
together.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from medsyngan.privacy.codec import pack_ring, ring_dtype, ring_mask

FIELD_PRIME = 2**521 - 1  # a Mersenne prime; every 32-byte secret is an element of the field
SECRET_BYTES = 32
SHARE_BYTES = (FIELD_PRIME.bit_length() + 7) // 8


class SecAggAbort(RuntimeError):
    """The round cannot complete securely (too few survivors, inconsistent messages); no sum is released."""


# --- Shamir secret sharing ----------------------------------------------------------------------------------

def shamir_split(secret: bytes, threshold: int, holders: Iterable[int]) -> dict[int, int]:
    """Shares f(x) of a random polynomial of degree t-1 with f(0) = secret, one per holder id x ≥ 1."""
    holders = sorted(set(holders))
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets are {SECRET_BYTES} bytes")
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold {threshold} must lie in [1, {len(holders)} holders]")
    if holders[0] < 1 or holders[-1] >= FIELD_PRIME:
        raise ValueError("holder ids must be positive field elements (x = 0 is the secret)")
    coeffs = [int.from_bytes(secret, "big")] + [_random_field_element() for _ in range(threshold - 1)]
    shares = {}
    for x in holders:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % FIELD_PRIME
        shares[x] = acc
    return shares


def shamir_combine(shares: Mapping[int, int], threshold: int) -> bytes:
    """Lagrange interpolation at x = 0 from the first ``threshold`` shares (by holder id)."""
    if len(shares) < threshold:
        raise SecAggAbort(f"{len(shares)} shares cannot rebuild a secret that needs {threshold}")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % FIELD_PRIME
                den = den * (xi - xj) % FIELD_PRIME
        secret = (secret + yi * num * pow(den, -1, FIELD_PRIME)) % FIELD_PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise SecAggAbort("shares are inconsistent: the rebuilt value is not a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def _random_field_element() -> int:
    """Uniform in [0, p) by rejection sampling 521-bit strings (p = 2^521 - 1 rejects one value in 2^521)."""
    while True:
        value = int.from_bytes(os.urandom(SHARE_BYTES), "big") >> (8 * SHARE_BYTES - FIELD_PRIME.bit_length())
        if value < FIELD_PRIME:
            return value


# --- neighbour graph and configuration -------------------------------------------------------------------------

def neighbour_graph(ids: Sequence[int], neighbours: int, seed: bytes) -> dict[int, frozenset[int]]:
    """SecAgg+'s sparse graph: a Harary graph (ring lattice) over a seeded random order of the clients.

    Each client gets ``neighbours`` neighbours (rounded up to even: half on each side of the ring), the graph is
    connected and regular, and every client can recompute it from the public seed. 0 (or ≥ n-1) is the complete
    graph of the original protocol.
    """
    ids = sorted(ids)
    n = len(ids)
    if neighbours == 0 or neighbours >= n - 1:
        return {u: frozenset(v for v in ids if v != u) for u in ids}
    half = (neighbours + 1) // 2
    order = np.random.default_rng(np.frombuffer(_hkdf(seed, b"secagg-graph", 32), np.uint32)).permutation(ids)
    graph: dict[int, set[int]] = {u: set() for u in ids}
    for pos, u in enumerate(order):
        for d in range(1, half + 1):
            v = int(order[(pos + d) % n])
            graph[int(u)].add(v)
            graph[v].add(int(u))
    return {u: frozenset(vs) for u, vs in graph.items()}


def threshold_for(fraction: float, holders: int) -> int:
    """Shares needed per neighbourhood: ceil(fraction · holders), at least a strict majority of the holders."""
    return min(holders, max(math.ceil(fraction * holders), holders // 2 + 1))


@dataclass(frozen=True)
class SecAggConfig:
    """Public parameters of one secure-aggregation round, identical at the server and every client.

    ``threshold`` is the number of shares needed to rebuild a client's secrets, counted in its neighbourhood
    (itself and its neighbours). ``context`` binds keys, graph and masks to one run and round (e.g.
    ``f"{run_id}/{round}".encode()``).
    """

    ids: tuple[int, ...]
    threshold: int
    ring_bits: int
    length: int
    neighbours: int = 0
    context: bytes = b""

    def __post_init__(self):
        ids = tuple(sorted(self.ids))
        object.__setattr__(self, "ids", ids)
        if len(ids) < 2 or len(set(ids)) != len(ids) or ids[0] < 1:
            raise ValueError("secure aggregation needs at least 2 clients with distinct ids ≥ 1")
        ring_dtype(self.ring_bits)
        smallest = min(len(self.graph[u]) + 1 for u in ids)
        if not smallest // 2 < self.threshold <= smallest:
            raise ValueError(
                f"threshold {self.threshold} must be a strict majority of the smallest neighbourhood "
                f"({smallest}) and at most its size"
            )

    @cached_property
    def graph(self) -> dict[int, frozenset[int]]:
        return neighbour_graph(self.ids, self.neighbours, self.context)

    def holders(self, u: int) -> frozenset[int]:
        return self.graph[u] | {u}


@dataclass(frozen=True)
class KeyAdvert:
    cipher_public: bytes  # c_u: share encryption
    mask_public: bytes  # s_u: pairwise mask agreement


# --- primitives ---------------------------------------------------------------------------------------------

def _hkdf(ikm: bytes, label: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=label).derive(ikm)


def prg(seed: bytes, length: int, ring_bits: int) -> np.ndarray:
    """``length`` uniform elements of Z_{2^k}: the ChaCha20 keystream of a 256-bit seed, masked to k bits."""
    dtype = np.dtype(ring_dtype(ring_bits)).newbyteorder("<")
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    stream = encryptor.update(bytes(length * dtype.itemsize))
    return (np.frombuffer(stream, dtype) & dtype.type(ring_mask(ring_bits))).astype(ring_dtype(ring_bits), copy=False)


def _accumulate(total: np.ndarray, vector: np.ndarray, sign: int, ring_bits: int) -> None:
    """total ← total ± vector (mod 2^k), in place: masks are as large as the model, so no temporaries."""
    (np.add if sign > 0 else np.subtract)(total, vector, out=total)
    np.bitwise_and(total, total.dtype.type(ring_mask(ring_bits)), out=total)


def _pair_seed(secret: X25519PrivateKey, peer: bytes, u: int, v: int, context: bytes) -> bytes:
    lo, hi = min(u, v), max(u, v)
    shared = secret.exchange(X25519PublicKey.from_public_bytes(peer))
    return _hkdf(shared, b"secagg-mask" + struct.pack("<QQ", lo, hi), salt=context)


def _share_key(secret: X25519PrivateKey, peer: bytes, sender: int, recipient: int, context: bytes) -> bytes:
    shared = secret.exchange(X25519PublicKey.from_public_bytes(peer))
    return _hkdf(shared, b"secagg-share" + struct.pack("<QQ", sender, recipient), salt=context)


def _sign(u: int, v: int) -> int:
    return 1 if u < v else -1


# --- client -------------------------------------------------------------------------------------------------

class SecAggClient:
    """One hospital's side of one round. Keys and seeds are fresh per instance: make one per round."""

    def __init__(self, client_id: int, config: SecAggConfig):
        if client_id not in config.ids:
            raise ValueError(f"client {client_id} is not in this round's ids")
        self.id, self.config = client_id, config
        self._cipher_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._self_seed = os.urandom(SECRET_BYTES)
        self._adverts: dict[int, KeyAdvert] = {}
        self._held: dict[int, tuple[int, int]] = {}  # peer → (share of b_peer, share of s_peer)
        self._masked_with: frozenset[int] = frozenset()
        self._revealed = False

    def to_bytes(self) -> bytes:
        """This client's secrets and progress, to carry it between the stages of a round when each stage may run
        in another process (Flower keeps it in the hospital's own ``context.state``; it never leaves the site)."""
        return json.dumps({
            "id": self.id,
            "cipher_key": self._cipher_key.private_bytes_raw().hex(),
            "mask_key": self._mask_key.private_bytes_raw().hex(),
            "self_seed": self._self_seed.hex(),
            "adverts": {str(v): [a.cipher_public.hex(), a.mask_public.hex()] for v, a in self._adverts.items()},
            "held": {str(v): [hex(b), hex(s)] for v, (b, s) in self._held.items()},
            "masked_with": sorted(self._masked_with),
            "revealed": self._revealed,
        }).encode()

    @classmethod
    def from_bytes(cls, data: bytes, config: SecAggConfig) -> "SecAggClient":
        state = json.loads(data)
        client = cls(int(state["id"]), config)
        client._cipher_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(state["cipher_key"]))
        client._mask_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(state["mask_key"]))
        client._self_seed = bytes.fromhex(state["self_seed"])
        client._adverts = {int(v): KeyAdvert(bytes.fromhex(c), bytes.fromhex(m))
                           for v, (c, m) in state["adverts"].items()}
        client._held = {int(v): (int(b, 16), int(sh, 16)) for v, (b, sh) in state["held"].items()}
        client._masked_with = frozenset(int(v) for v in state["masked_with"])
        client._revealed = bool(state["revealed"])
        return client

    def advertise(self) -> KeyAdvert:
        return KeyAdvert(self._cipher_key.public_key().public_bytes_raw(),
                         self._mask_key.public_key().public_bytes_raw())

    def share_keys(self, adverts: Mapping[int, KeyAdvert]) -> dict[int, bytes]:
        """Stage 1: encrypted shares for each neighbour that advertised keys (recipient → ciphertext)."""
        t = self.config.threshold
        holders = self.config.holders(self.id) & set(adverts)
        if self.id not in adverts:
            raise SecAggAbort(f"client {self.id}: the server's key list omits this client")
        if len(holders) < t:
            raise SecAggAbort(f"client {self.id}: {len(holders)} of its neighbourhood advertised keys, "
                              f"fewer than the threshold {t}")
        self._adverts = dict(adverts)
        b_shares = shamir_split(self._self_seed, t, holders)
        s_shares = shamir_split(self._mask_key.private_bytes_raw(), t, holders)
        self._held[self.id] = (b_shares[self.id], s_shares[self.id])
        out = {}
        for v in sorted(holders - {self.id}):
            key = _share_key(self._cipher_key, adverts[v].cipher_public, self.id, v, self.config.context)
            nonce = os.urandom(12)  # one message under a key unique to (round, sender, recipient)
            body = (struct.pack("<QQ", self.id, v) + b_shares[v].to_bytes(SHARE_BYTES, "big")
                    + s_shares[v].to_bytes(SHARE_BYTES, "big"))
            out[v] = nonce + AESGCM(key).encrypt(nonce, body, self.config.context + struct.pack("<QQ", self.id, v))
        return out

    def masked_input(self, x: np.ndarray, inbox: Mapping[int, bytes], binding: bytes = b"") -> np.ndarray:
        """Stage 2: decrypt the shares routed to this client, then mask x (elements of Z_{2^k}).

        ``binding`` (the hash of the global model this client trained from) enters every pairwise mask: clients
        sent different models derive masks that do not cancel, so a server that gives one client another model
        (to single out its update in the sum) unmasks only noise."""
        cfg = self.config
        if x.shape != (cfg.length,) or x.dtype != ring_dtype(cfg.ring_bits):
            raise ValueError(f"input must be a ({cfg.length},) {np.dtype(ring_dtype(cfg.ring_bits))} ring vector")
        if np.any(x > ring_mask(cfg.ring_bits)):
            raise ValueError(f"input holds values ≥ 2^{cfg.ring_bits}")
        for v, ct in inbox.items():
            if v not in cfg.graph[self.id] or v not in self._adverts:
                raise SecAggAbort(f"client {self.id}: got shares from {v}, which is not a neighbour with keys")
            key = _share_key(self._cipher_key, self._adverts[v].cipher_public, v, self.id, cfg.context)
            try:
                body = AESGCM(key).decrypt(ct[:12], ct[12:], cfg.context + struct.pack("<QQ", v, self.id))
            except InvalidTag:
                raise SecAggAbort(f"client {self.id}: shares from {v} fail authentication") from None
            b_share = int.from_bytes(body[16:16 + SHARE_BYTES], "big")
            s_share = int.from_bytes(body[16 + SHARE_BYTES:], "big")
            self._held[v] = (b_share, s_share)
        self._masked_with = frozenset(inbox)
        k = cfg.ring_bits
        y = x.copy()
        _accumulate(y, prg(self._self_seed, cfg.length, k), 1, k)
        for v in sorted(self._masked_with):
            seed = _pair_seed(self._mask_key, self._adverts[v].mask_public, self.id, v, cfg.context + binding)
            _accumulate(y, prg(seed, cfg.length, k), _sign(self.id, v), k)
        return y

    def unmask(self, survivors: Iterable[int]) -> dict[int, tuple[str, int]]:
        """Stage 3: for each peer whose shares this client holds, its b-share (survivor) or s-share (dropout)."""
        survivors = frozenset(survivors)
        if self._revealed:
            raise SecAggAbort(f"client {self.id}: shares were already revealed this round")
        if self.id not in survivors:
            raise SecAggAbort(f"client {self.id}: the survivor list omits this client")
        held = set(self._held)
        if not survivors & self.config.holders(self.id) <= held:
            raise SecAggAbort(f"client {self.id}: survivor list names neighbours that never shared keys")
        if len(survivors & held) < self.config.threshold:
            raise SecAggAbort(f"client {self.id}: only {len(survivors & held)} survivors in its neighbourhood, "
                              f"fewer than the threshold {self.config.threshold}")
        self._revealed = True
        return {v: ("b", b) if v in survivors else ("s", s) for v, (b, s) in sorted(self._held.items())}


# --- server -------------------------------------------------------------------------------------------------

@dataclass
class SecAggServer:
    """The aggregator's side of one round: routes messages, tracks the sets U1 ⊇ U2 ⊇ U3, unmasks the sum."""

    config: SecAggConfig
    adverts: dict[int, KeyAdvert] = field(default_factory=dict)
    shared: frozenset[int] = frozenset()
    masked: dict[int, np.ndarray] = field(default_factory=dict)

    def _need(self, stage: str, present: Iterable[int]) -> None:
        present = frozenset(present)
        t = self.config.threshold
        if len(present) < t:
            raise SecAggAbort(f"secure aggregation {stage}: {len(present)} clients left, fewer than the "
                              f"threshold {t}; the round is abandoned without releasing anything")

    def collect_adverts(self, adverts: Mapping[int, KeyAdvert]) -> dict[int, KeyAdvert]:
        """Stage 0 → 1: the key list every client receives (U1)."""
        unknown = set(adverts) - set(self.config.ids)
        if unknown:
            raise SecAggAbort(f"key adverts from unknown clients {sorted(unknown)}")
        self._need("after advertising keys", adverts)
        self.adverts = dict(adverts)
        return dict(self.adverts)

    def route_shares(self, shares: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Stage 1 → 2: each client's inbox of ciphertexts (recipient → sender → ciphertext); senders form U2."""
        senders = frozenset(shares) & frozenset(self.adverts)
        self._need("after sharing keys", senders)
        self.shared = senders
        inbox: dict[int, dict[int, bytes]] = {u: {} for u in senders}
        for u in senders:
            for v, ct in shares[u].items():
                if v in senders:
                    inbox[v][u] = ct
        return inbox

    def collect_masked(self, masked: Mapping[int, np.ndarray]) -> frozenset[int]:
        """Stage 2 → 3: the survivor list U3 that every survivor receives."""
        k, n = self.config.ring_bits, self.config.length
        for u, y in masked.items():
            if u not in self.shared:
                raise SecAggAbort(f"masked input from client {u}, which did not share keys")
            if y.shape != (n,) or y.dtype != ring_dtype(k):
                raise SecAggAbort(f"masked input from client {u} has shape {y.shape} and type {y.dtype}")
        self._need("after masked input", masked)
        self.masked = dict(masked)
        return frozenset(masked)

    def unmask(self, reveals: Mapping[int, Mapping[int, tuple[str, int]]], binding: bytes = b"") -> np.ndarray:
        """Stage 3: Σ_{u ∈ U3} x_u mod 2^k from the survivors' revealed shares; ``binding`` as the clients'
        (:meth:`SecAggClient.masked_input`)."""
        cfg, k = self.config, self.config.ring_bits
        survivors = frozenset(self.masked)
        responders = frozenset(reveals) & survivors
        self._need("at unmasking", responders)
        dropped = self.shared - survivors
        b_shares: dict[int, dict[int, int]] = {u: {} for u in survivors}
        s_shares: dict[int, dict[int, int]] = {v: {} for v in dropped}
        for holder in responders:
            for peer, (kind, share) in reveals[holder].items():
                if kind == "b" and peer in survivors:
                    b_shares[peer][holder] = share
                elif kind == "s" and peer in dropped:
                    s_shares[peer][holder] = share
                else:
                    raise SecAggAbort(f"client {holder} revealed a {kind!r}-share of client {peer}, "
                                      "inconsistent with the survivor list")
        total = np.zeros(cfg.length, ring_dtype(k))
        for u in sorted(survivors):
            _accumulate(total, self.masked[u], 1, k)
            seed = self._rebuild(b_shares[u], f"self-mask seed of client {u}")
            _accumulate(total, prg(seed, cfg.length, k), -1, k)
        for v in sorted(dropped):
            affected = sorted(cfg.graph[v] & survivors)
            if not affected:
                continue
            secret = X25519PrivateKey.from_private_bytes(self._rebuild(s_shares[v], f"mask key of dropped client {v}"))
            if secret.public_key().public_bytes_raw() != self.adverts[v].mask_public:
                raise SecAggAbort(f"the rebuilt mask key of client {v} does not match its advertised key")
            for u in affected:
                mask = prg(_pair_seed(secret, self.adverts[u].mask_public, u, v, cfg.context + binding), cfg.length, k)
                # y_u carries sign(u, v)·mask; take it back out.
                _accumulate(total, mask, -_sign(u, v), k)
        return total

    def _rebuild(self, shares: Mapping[int, int], what: str) -> bytes:
        t = self.config.threshold
        if len(shares) < t:
            raise SecAggAbort(f"cannot rebuild the {what}: {len(shares)} shares arrived, {t} are needed; "
                              "too many hospitals dropped out of its neighbourhood")
        return shamir_combine(shares, t)


# --- in-process driver -------------------------------------------------------------------------------------

@dataclass
class SecAggTrace:
    """What one simulated round produced: the sum, who survived, bytes on the wire and compute time per stage.

    ``client_seconds[stage]`` sums every client's time in that stage (divide by the number of clients for one
    hospital's share); ``server_seconds[stage]`` is the server's.
    """

    total: np.ndarray
    survivors: frozenset[int]
    bytes_up: dict[str, int] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)
    client_seconds: dict[str, float] = field(default_factory=dict)
    server_seconds: dict[str, float] = field(default_factory=dict)


def simulate(config: SecAggConfig, inputs: Mapping[int, np.ndarray],
             drop_after: Mapping[int, Iterable[int]] | None = None) -> SecAggTrace:
    """Run the four stages in one process; ``drop_after[s]`` are clients that vanish once stage s is done.

    This is the reference for how the federation sequences the stages, and what tests and benchmarks drive.
    Byte counts are payload sizes (keys, ciphertexts, packed ring vectors, 66-byte shares), not framing.
    """
    drop_after = {s: frozenset(c) for s, c in (drop_after or {}).items()}
    trace = SecAggTrace(np.zeros(0), frozenset())
    clock = time.perf_counter

    def timed(table: dict[str, float], stage: str, fn, *args):
        start = clock()
        result = fn(*args)
        table[stage] = table.get(stage, 0.0) + clock() - start
        return result

    clients = {u: SecAggClient(u, config) for u in config.ids}
    server = SecAggServer(config)
    alive = set(config.ids)
    up, down, cs, ss = trace.bytes_up, trace.bytes_down, trace.client_seconds, trace.server_seconds

    adverts = {u: timed(cs, "advertise", clients[u].advertise) for u in sorted(alive)}
    up["advertise"] = 64 * len(adverts)
    key_list = timed(ss, "advertise", server.collect_adverts, adverts)
    alive -= drop_after.get(0, frozenset())
    down["advertise"] = 64 * len(key_list) * len(alive)

    shares = {u: timed(cs, "share", clients[u].share_keys, key_list) for u in sorted(alive)}
    up["share"] = sum(len(ct) for out in shares.values() for ct in out.values())
    inboxes = timed(ss, "share", server.route_shares, shares)
    alive -= drop_after.get(1, frozenset())
    down["share"] = sum(len(ct) for u in alive for ct in inboxes.get(u, {}).values())

    masked = {u: timed(cs, "masked", clients[u].masked_input, inputs[u], inboxes[u]) for u in sorted(alive)}
    up["masked"] = sum(len(pack_ring(y, config.ring_bits)) for y in masked.values())
    survivors = timed(ss, "masked", server.collect_masked, masked)
    alive -= drop_after.get(2, frozenset())
    down["masked"] = 8 * len(survivors) * len(alive)

    reveals = {u: timed(cs, "unmask", clients[u].unmask, survivors) for u in sorted(alive)}
    up["unmask"] = sum((8 + SHARE_BYTES) * len(r) for r in reveals.values())
    trace.total = timed(ss, "unmask", server.unmask, reveals)
    trace.survivors = survivors
    return trace
