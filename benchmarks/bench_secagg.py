"""Secure aggregation cost: time and bytes of one round versus hospitals (3, 10, 30), model size and graph.

Every hospital and the server run in this one process (the time a real round takes is the slowest hospital's
client time plus the server's, not their sum). Inputs are 16-bit quantized updates in the ring of
``ring_bits(16, hospitals)`` bits. Reference, measured in the same run: the plain (insecure) aggregation of the
same quantized vectors — the server sums them in the ring — and the bytes of sending the surviving hospitals'
16-bit updates as they are (2 bytes per parameter; the ring needs 3). Ratios are secure ÷ plain. Small cases
are timed three times and the fastest kept (the machine is shared).
Run: ``python benchmarks/bench_secagg.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from medsyngan.privacy.codec import qmax, ring_add, ring_bits, to_ring  # noqa: E402
from medsyngan.privacy.secagg import SecAggConfig, simulate, threshold_for  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "secagg.json"
BITS = 16


def dcgan64_parameters() -> int:
    """G + D parameters of the dcgan64 preset, counted from the models themselves."""
    from medsyngan.config import load_config
    from medsyngan.models.registry import build_discriminator, build_generator

    model = load_config("dcgan64").model
    return sum(p.numel() for net in (build_generator(model), build_discriminator(model)) for p in net.parameters())


def sparse_neighbours(hospitals: int) -> int:
    """SecAgg+ degree: about log2(n), rounded up to even (the Harary graph takes half on each side)."""
    k = math.ceil(math.log2(hospitals))
    return k + k % 2


def plain_round(inputs: dict[int, np.ndarray], k: int) -> float:
    """Reference: the server sums the hospitals' ring vectors as they are (no protection)."""
    start = time.perf_counter()
    vectors = list(inputs.values())
    total = vectors[0].copy()
    for x in vectors[1:]:
        total = ring_add(total, x, k)
    return time.perf_counter() - start


def bench_case(hospitals: int, length: int, neighbours: int, dropouts: int) -> dict:
    k = ring_bits(BITS, hospitals)
    holders = (neighbours or hospitals - 1) + 1
    config = SecAggConfig(tuple(range(1, hospitals + 1)), threshold_for(0.66, holders), k, length, neighbours,
                          b"bench/round-1")
    rng = np.random.default_rng(0)
    q = qmax(BITS)
    inputs = {u: to_ring(rng.integers(-q, q + 1, length), k) for u in config.ids}
    plain_bytes = (hospitals - dropouts) * length * BITS // 8
    repeats = 3 if hospitals * length < 20_000_000 else 1
    plain_s = min(plain_round(inputs, k) for _ in range(repeats))
    client_s = server_s = math.inf
    for _ in range(repeats):
        # Dropouts after sharing keys: the case where the server must rebuild mask keys and regenerate masks.
        trace = simulate(config, inputs, {1: set(range(1, dropouts + 1))})
        client_s = min(client_s, sum(trace.client_seconds.values()) / hospitals)
        server_s = min(server_s, sum(trace.server_seconds.values()))
    secure_bytes = sum(trace.bytes_up.values()) + sum(trace.bytes_down.values())
    return {
        "hospitals": hospitals, "parameters": length, "graph": f"sparse k={neighbours}" if neighbours else "complete",
        "dropouts": dropouts, "ring_bits": k, "threshold": config.threshold,
        "client_s": client_s, "server_s": server_s, "round_s": client_s + server_s,
        "plain_s": plain_s, "time_ratio": (client_s + server_s) / plain_s,
        "mb_per_hospital": secure_bytes / (hospitals - dropouts) / 1e6,
        "plain_mb_per_hospital": plain_bytes / (hospitals - dropouts) / 1e6,
        "bytes_ratio": secure_bytes / plain_bytes,
    }


def run(quick: bool = False) -> dict:
    full = dcgan64_parameters()
    sizes = {"dcgan64": full, "dcgan64/10": full // 10}
    cases = []
    for hospitals in ((3, 10) if quick else (3, 10, 30)):
        for name, length in sizes.items():
            if quick and name == "dcgan64" and hospitals > 3:
                continue
            graphs = [0] if hospitals <= 3 else [0, sparse_neighbours(hospitals)]
            for neighbours in graphs:
                drops = [0] if quick or hospitals <= 3 else [0, max(1, hospitals // 10)]
                for dropouts in drops:
                    case = bench_case(hospitals, length, neighbours, dropouts)
                    case["model"] = name
                    cases.append(case)
    return {"dcgan64_parameters": full, "quantization_bits": BITS, "cases": cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small cases only")
    figures = run(parser.parse_args().quick)
    print(f"DCGAN-64 G+D parameters: {figures['dcgan64_parameters']:,}; {BITS}-bit quantized updates")
    head = ("model", "hosp", "graph", "drop", "k", "t", "client s", "server s", "round s", "plain s", "× time",
            "MB/surv", "int16 MB", "× bytes")
    print(("{:<11}{:>5}  {:<12}{:>5}{:>4}{:>4}" + "{:>10}" * 8).format(*head))
    for c in figures["cases"]:
        print(("{:<11}{:>5}  {:<12}{:>5}{:>4}{:>4}" + "{:>10.3f}" * 4 + "{:>10.0f}{:>10.2f}{:>10.2f}{:>10.3f}").format(
            c["model"], c["hospitals"], c["graph"], c["dropouts"], c["ring_bits"], c["threshold"], c["client_s"],
            c["server_s"], c["round_s"], c["plain_s"], c["time_ratio"], c["mb_per_hospital"],
            c["plain_mb_per_hospital"], c["bytes_ratio"]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
