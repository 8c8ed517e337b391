"""A fixed-seed run is part of the product's behaviour: the same configuration and seed must give the same weights,
whatever the code around the training step is reorganised into. The fingerprints below were measured on the
reference implementation (float32, one thread); a change that moves them changes every result in the docs."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from medsyngan.training.checkpoint import load_checkpoint
from federation_settings import WITHOUT_DP

COMMON = ["run.device=cpu", "run.threads=1", 'train.amp="off"', "model.ngf=8", "model.ndf=8", "model.z_dim=16",
          "model.resolution=32", "data.size=32", "data.phantom_patients=24", "data.phantom_images_per_patient=2",
          "train.batch_size=8", "train.ema_kimg=0.05"]

# Per network: (sum of all float weights, sum of squares, projection on a fixed Gaussian vector).
CENTRALIZED = {"G": (82.49865195068014, 79.06111302904833, 16.838545635333695),
               "D": (56.607319708780096, 53.8616536575655, 2.1963993555808488),
               "G_ema": (82.71521426129856, 79.05344689833228, 3.070634595750595)}
FEDERATED = {"G": (108.69928908635484, 118.7357623239651, 12.377298066281602),
             "D": (49.28679403817114, 52.680884023037464, -3.070598216182825),
             "G_ema": (108.8058107119395, 118.88319863117133, -16.000378647559458)}


def fingerprint(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[float, float, float]]:
    gen = torch.Generator().manual_seed(1234)
    out = {}
    for part in ("G", "D", "G_ema"):
        keys = sorted(k for k in tensors if k.startswith(part + ".") and tensors[k].is_floating_point())
        flat = torch.cat([tensors[k].double().flatten() for k in keys])
        projection = torch.randn(flat.numel(), generator=gen, dtype=torch.float64)
        out[part] = (float(flat.sum()), float(flat.square().sum()), float(flat @ projection))
    return out


def assert_matches(measured, recorded) -> None:
    # Tolerance for another CPU's float32 kernels (summation order), far below what any change of algorithm moves.
    for part, values in recorded.items():
        scale = math.sqrt(values[1])
        for got, want in zip(measured[part], values):
            assert abs(got - want) <= 1e-4 * (abs(want) + scale), (part, measured[part], values)


def train(out, preset: str, overrides: list[str]) -> dict:
    args = [sys.executable, "-m", "medsyngan.cli", "train", "--config", preset, "--out", str(out)]
    for item in COMMON + overrides:
        args += ["--set", item]
    subprocess.run(args, check=True, capture_output=True, text=True)
    return fingerprint(load_checkpoint(out).tensors)


def test_a_fixed_seed_centralized_run_gives_the_recorded_weights(tmp_path, medsyngan_cache):
    measured = train(tmp_path / "run", "dcgan64", ["train.steps=6", "train.checkpoint_every=6", "train.sample_every=6"])
    assert_matches(measured, CENTRALIZED)


@pytest.mark.slow
def test_a_fixed_seed_federated_run_gives_the_recorded_weights(tmp_path, medsyngan_cache):
    """Three hospitals, 8-bit secure aggregation with AES-GCM (the federated preset without DP, whose noise seed is
    secret by design; the hospitals' policy allows it)."""
    measured = train(tmp_path / "run", "federated-dcgan64", [
        *WITHOUT_DP, "federated.rounds=2", "federated.local_steps=2", "federated.eval_every=2",
        "federated.holdout_fraction=0", "train.batch_size=4"])
    assert_matches(measured, FEDERATED)
