"""Federation overhead: wall time of a federated run ÷ the sum of its hospitals' local training time.

DCGAN-64 (textbook widths) on phantoms, Flower's Simulation Engine. Virtual hospitals take turns on all cores
(federated.client_cpus = cores), so the sum of local training time is what one machine would spend training
them one after another, and everything above it is the federation's cost: Ray and Flower start-up, messages,
(de)serialization, secure-aggregation stages, encryption, aggregation and per-round checkpoints. Local steps per
round are calibrated from a measured step time so that each hospital's round is ≈ ROUND_SECONDS of local work.

Also printed: bytes each hospital sends per round beside the raw float32 size of what it shares.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

from medsyngan.config import load_config  # noqa: E402
from medsyngan.rundir import RunDir  # noqa: E402

TARGET_RATIO_3 = 1.15


def _step_seconds(cfg, steps: int = 4) -> float:
    """Seconds per local generator step of one hospital (DP on when the configuration says so)."""
    import numpy as np
    import torch

    from medsyngan.data.api import load_training_data
    from medsyngan.federated.hospital import Hospital

    torch.set_num_threads(cfg.federated.client_cpus)
    data = load_training_data(cfg)
    rows = np.arange(len(data))[: max(cfg.train.batch_size * 4, len(data) // cfg.federated.hospitals)]
    hospital = Hospital(cfg, 0, data.subset(rows))
    state = hospital.trainer.model_state(("G", "D"))
    hospital.train_round(state, 1)
    start = time.perf_counter()
    hospital.train_round(state, steps)
    return (time.perf_counter() - start) / steps


def measure(hospitals: int, round_seconds: float, rounds: int, private: bool, work: Path) -> dict:
    from medsyngan.workflows.federation import train_federated

    cores = os.cpu_count() or 1
    base = [f"federated.hospitals={hospitals}", f"federated.quorum={hospitals}", f"federated.rounds={rounds}",
            f"federated.client_cpus={cores}", "federated.eval_every=1000", "eval.num_samples=16",
            f"data.phantom_patients={max(600, 200 * hospitals)}", "run.seed=1", "data.seed=1"]
    if not private:
        base += ["privacy.dp=false", "privacy.secagg=false", "privacy.encrypt=false", "privacy.quantize_bits=0",
                 "hospital.dp_required=false", "hospital.secagg_required=false", "hospital.encrypt_required=false"]
    cfg = load_config("federated-dcgan64", base)
    step = _step_seconds(cfg)
    local_steps = max(1, math.ceil(round_seconds / step))
    cfg = load_config("federated-dcgan64", base + [f"federated.local_steps={local_steps}",
                                                  "federated.round_timeout_s=3600"])
    run_dir = RunDir(work / f"h{hospitals}-{'private' if private else 'plain'}").create(cfg)
    start = time.perf_counter()
    train_federated(cfg, run_dir, resume=False)
    wall = time.perf_counter() - start
    rows = [r for r in run_dir.read_metrics() if "hospital" in r]
    local = sum(h["train_seconds"] for r in rows for h in r["hospital"].values())
    first_round_end = rows[0]["wall_s"]
    last = rows[-1]["wall_s"]
    # Steady state: from the end of round 1 to the end of the last round, against the local work of those rounds.
    steady_local = sum(h["train_seconds"] for r in rows[1:] for h in r["hospital"].values())
    sent = [h["bytes_received_from"] for r in rows for h in r["hospital"].values()]
    shared_params = sum(v.numel() for k, v in _shared(cfg).items())
    return {
        "hospitals": hospitals, "private": private, "rounds": len(rows), "local_steps": local_steps,
        "step_seconds": round(step, 3), "wall_s": round(wall, 1), "local_train_s": round(local, 1),
        "ratio_total": round(wall / local, 3),
        "ratio_steady": round((last - first_round_end) / steady_local, 3) if steady_local else None,
        "bytes_per_hospital_round": round(sum(sent) / len(sent)),
        "float32_shared_bytes": 4 * shared_params,
    }


def _shared(cfg):
    from medsyngan.federated.hospital import shared_parts
    from medsyngan.training.step import GANTrainer

    trainer = GANTrainer(cfg, device="cpu")
    return trainer.model_state(shared_parts(cfg))


def run(quick: bool) -> dict:
    round_seconds, rounds = (4.0, 2) if quick else (30.0, 3)
    figures: dict = {"round_seconds_target": round_seconds}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MEDSYNGAN_CACHE", str(Path(tmp) / "cache"))
        cases = [(3, False), (3, True)] + ([] if quick else [(10, True)])
        for hospitals, private in cases:
            result = measure(hospitals, round_seconds, rounds, private, Path(tmp))
            tag = f"h{hospitals}_{'private' if private else 'plain'}"
            for key, value in result.items():
                if key not in ("hospitals", "private"):
                    figures[f"{tag}_{key}"] = value
    figures["target_ratio_3_hospitals"] = TARGET_RATIO_3
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="rounds of ~4 s instead of ~30 s; no 10-hospital run")
    args = parser.parse_args()
    figures = run(args.quick)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
