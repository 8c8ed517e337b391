"""Short, equal-budget comparisons of federation choices on phantoms (the note asked for in the federated and
privacy issues): shared vs local discriminators, FedAvg vs FedAdam vs FedProx, and float32 vs 8-bit quantized
updates (bytes and sample quality). Everything else is fixed; each variant trains the same number of rounds and
local steps from the same seed and is scored by random-feature FD/KID against the phantoms' test patients.

    python benchmarks/compare_federation.py [--quick] [--out docs/federation-comparison.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

import numpy as np  # noqa: E402

from medsyngan.config import load_config  # noqa: E402
from medsyngan.rundir import RunDir, atomic_write_text  # noqa: E402

VARIANTS = {
    "FedAvg, shared D, float32": [],
    "FedAvg, local D (only G shared), float32": ["federated.share_discriminator=false"],
    "FedAdam (server lr 0.01), shared D, float32": ["federated.strategy=fedadam", "federated.server_lr=0.01"],
    "FedProx (μ 0.01), shared D, float32": ["federated.strategy=fedprox", "federated.proximal_mu=0.01"],
    "FedAvg, shared D, 8-bit + clip 5": ["privacy.quantize_bits=8", "privacy.update_clip=5.0"],
    "FedAvg, shared D, float32 + clip 5": ["privacy.update_clip=5.0"],
    "FedAvg, shared D, 8-bit": ["privacy.quantize_bits=8"],
    "FedAvg, shared D, 8-bit + secure aggregation": ["privacy.quantize_bits=8", "privacy.secagg=true"],
}


def base(quick: bool) -> list[str]:
    size = 32 if quick else 64
    return [
        f"data.size={size}", f"model.resolution={size}", "model.ngf=16", "model.ndf=16", "model.z_dim=64",
        "data.phantom_patients=150", "data.phantom_images_per_patient=2", "data.split=train_val",
        "train.batch_size=16", f"federated.rounds={4 if quick else 10}", f"federated.local_steps={5 if quick else 25}",
        "federated.eval_every=1000", "eval.num_samples=64", "run.seed=11", "data.seed=11",
        # Privacy mechanisms are varied one at a time below; DP is left out so its noise does not mask them.
        "privacy.dp=false", "privacy.secagg=false", "privacy.encrypt=false", "privacy.quantize_bits=0",
        "privacy.update_clip=0",
        # The hospitals' policy must allow every variant, the plain one included.
        "hospital.dp_required=false", "hospital.secagg_required=false", "hospital.encrypt_required=false",
    ]


def score(run_dir: RunDir, cfg, test_images: np.ndarray) -> dict:
    from medsyngan.metrics import evaluate_images
    from medsyngan.training.generate import generate_images, load_generator

    G, _ = load_generator(run_dir.root)
    fake = generate_images(G, 300, seed=0)
    return evaluate_images(fake, test_images, metrics=["fd", "kid"], kid_subset_size=min(100, len(test_images)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "federation-comparison.md")
    parser.add_argument("--only", nargs="*", help="variant numbers to run (0-based), default all")
    args = parser.parse_args()
    from medsyngan.data.api import load_training_data, select_split
    from medsyngan.workflows.federation import train_federated

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MEDSYNGAN_CACHE", str(Path(tmp) / "cache"))
        everything = load_config("federated-dcgan64", base(args.quick) + ["data.split=all"])
        test = np.asarray(select_split(load_training_data(everything), "test", "phantoms").images)
        for index, (name, extra) in enumerate(VARIANTS.items()):
            if args.only and str(index) not in args.only:
                continue
            cfg = load_config("federated-dcgan64", base(args.quick) + extra)
            run_dir = RunDir(Path(tmp) / f"v{index}").create(cfg)
            start = time.perf_counter()
            train_federated(cfg, run_dir, resume=False)
            wall = time.perf_counter() - start
            rounds = [r for r in run_dir.read_metrics() if "hospital" in r]
            sent = [h["bytes_received_from"] for r in rounds for h in r["hospital"].values()]
            metrics = score(run_dir, cfg, test)
            fd = next(v for k, v in metrics.items() if k.startswith("fd"))
            kid = next(v for k, v in metrics.items() if k.startswith("kid") and not k.endswith("_std"))
            rows.append({"variant": name, "fd_random": round(fd, 3), "kid_random": round(kid, 4),
                         "bytes_per_hospital_round": int(np.mean(sent)), "wall_s": round(wall, 1),
                         "kimg": rounds[-1]["kimg"]})
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        "# Federation choices compared (phantoms, equal budget)", "",
        f"Command: `python benchmarks/compare_federation.py{' --quick' if args.quick else ''}`; "
        f"{os.cpu_count()} CPU cores; settings: `{' '.join(base(args.quick))}` on the `federated-dcgan64` preset.",
        "One seed per variant, so differences of a few FD points are within run-to-run noise.", "",
        "| variant | FD (random features) ↓ | KID ↓ | bytes / hospital / round | wall s | kimg |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['variant']} | {r['fd_random']} | {r['kid_random']} | {r['bytes_per_hospital_round']:,} | "
              f"{r['wall_s']} | {r['kimg']} |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
