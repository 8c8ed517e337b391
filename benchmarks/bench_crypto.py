"""Encryption throughput: AES-256-GCM seal/open of a DCGAN-64-sized update, against memcpy and SHA-256.

The update is the dcgan64 preset's G + D parameters, as float32 (what travels without quantization) and as the
16-bit quantized form. Seal includes the per-round X25519 agreements and HKDF; open includes the header checks
and replay bookkeeping. References in the same run, on the same bytes: a memory copy and hashlib SHA-256 (the
hash already computed over the global model each round). Each figure is the best of several repetitions.
Run: ``python benchmarks/bench_crypto.py [--quick]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402

from medsyngan.privacy.crypto import HospitalSession, UpdateReceiver, decrypt_at_rest, encrypt_at_rest  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "crypto.json"


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_payload(payload: bytes, repeats: int) -> dict:
    mb = len(payload) / 1e6
    identity = X25519PrivateKey.generate()
    model_hash = hashlib.sha256(b"global model").digest()
    seal_s = open_s = float("inf")
    for round_ in range(1, repeats + 1):
        agg = UpdateReceiver(identity, "bench")
        round_public = agg.round_public(round_)
        start = time.perf_counter()
        sealed = HospitalSession(identity.public_key(), "bench", "h1", round_, round_public).seal(payload, model_hash)
        middle = time.perf_counter()
        agg.open(sealed, hospital_id="h1", round_=round_, global_model_hash=model_hash)
        end = time.perf_counter()
        seal_s, open_s = min(seal_s, middle - start), min(open_s, end - middle)
    key = os.urandom(32)
    blob = encrypt_at_rest(payload, key, "checkpoint")
    figures = {
        "mb": mb,
        "seal_mb_s": mb / seal_s,
        "open_mb_s": mb / open_s,
        "at_rest_encrypt_mb_s": mb / _best(lambda: encrypt_at_rest(payload, key, "checkpoint"), repeats),
        "at_rest_decrypt_mb_s": mb / _best(lambda: decrypt_at_rest(blob, key, "checkpoint"), repeats),
        "memcpy_mb_s": mb / _best(lambda: bytearray(payload), repeats),
        "sha256_mb_s": mb / _best(lambda: hashlib.sha256(payload).digest(), repeats),
    }
    figures["seal_vs_sha256"] = figures["seal_mb_s"] / figures["sha256_mb_s"]
    figures["open_vs_sha256"] = figures["open_mb_s"] / figures["sha256_mb_s"]
    figures["seal_vs_memcpy"] = figures["seal_mb_s"] / figures["memcpy_mb_s"]
    return figures


def dcgan64_parameters() -> int:
    from medsyngan.config import load_config
    from medsyngan.models.registry import build_discriminator, build_generator

    model = load_config("dcgan64").model
    return sum(p.numel() for net in (build_generator(model), build_discriminator(model)) for p in net.parameters())


def run(quick: bool = False) -> dict:
    params = dcgan64_parameters()
    repeats = 3 if quick else 7
    return {
        "dcgan64_parameters": params,
        "float32": bench_payload(os.urandom(4 * params), repeats),
        "int16": bench_payload(os.urandom(2 * params), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    figures = run(parser.parse_args().quick)
    print(f"DCGAN-64 G+D parameters: {figures['dcgan64_parameters']:,}")
    rows = ("mb", "seal_mb_s", "open_mb_s", "at_rest_encrypt_mb_s", "at_rest_decrypt_mb_s", "memcpy_mb_s",
            "sha256_mb_s", "seal_vs_sha256", "open_vs_sha256", "seal_vs_memcpy")
    print(f"{'figure':<24}{'float32':>12}{'int16':>12}")
    for row in rows:
        print(f"{row:<24}{figures['float32'][row]:>12.2f}{figures['int16'][row]:>12.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
