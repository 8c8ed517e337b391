"""`medsyngan evaluate` end to end: metrics.json, a self-contained report.html, partial results, one-line errors."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsyngan.metrics import evaluate, evaluate_images
from medsyngan.metrics.images import read_image_folder
from medsyngan.report.html import write_report


def _write_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def sets(nih_dir, tmp_path_factory):
    images = read_image_folder(nih_dir / "images-64")
    root = tmp_path_factory.mktemp("evalsets")
    return {
        "images": images,
        "fake": _write_pngs(root / "fake", images[:40]),
        "real": _write_pngs(root / "real", images[40:80]),
        "train": _write_pngs(root / "train", np.concatenate([images[80:120], images[:2]])),  # 2 memorized
        "root": root,
    }


def _cli(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MEDSYNGAN_CACHE=str(tmp / "cache"), MEDSYNGAN_OFFLINE="1", TORCH_HOME=str(tmp / "torch"),
               COLUMNS="200")
    env.pop("MEDSYNGAN_INCEPTION_WEIGHTS", None)
    return subprocess.run([sys.executable, "-m", "medsyngan.cli", "evaluate", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def _check_self_contained(report: Path) -> str:
    text = report.read_text()
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs, "the report shows no image"
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert "<table id='metrics'>" in text
    return text


@pytest.mark.slow
def test_evaluate_fake_folder_writes_metrics_and_report(sets, tmp_path):
    out = tmp_path / "out"
    proc = _cli("--fake", str(sets["fake"]), "--real", str(sets["real"]), "--train", str(sets["train"]),
                "--out", str(out), "--epsilon", "1", "--delta", "1e-5", tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("fd40_64_random", "kid40_64_random", "precision40_64_random_k3", "coverage40_64_random_k5",
                "ssim_nn_train", "psnr_nn_train", "mse_nn_train", "msssim_div_fake", "msssim_div_real",
                "dcr_ratio_pixel", "mia_ganleaks_pixel_auc", "mia_ganleaks_pixel_tpr_fpr1e-3", "mia_bound_auc"):
        assert key in metrics, key
    assert metrics["near_copies_ssim0.95"] == 2  # the two synthetic images copied into the training set
    details = json.loads((out / "evaluation.json").read_text())
    assert [c["near_copy"] for c in details["closest_synthetic"][:3]] == [True, True, False]
    assert "ppl_randomfeat" in details["skipped"]  # not applicable to a folder of images: no error
    text = _check_self_contained(out / "report.html")
    assert "near-copy" in text and "Membership inference" in text


@pytest.mark.slow
def test_python_api_and_report(sets, tmp_path, medsyngan_cache):
    images = sets["images"]
    ev = evaluate(images[:30], images[30:60], images[60:90], metrics="fd,nn,privacy", epsilon=2.0)
    assert set(ev.metrics) >= {"fd30_64_random", "ssim_nn_train", "mia_bound_tpr_fpr1e-2"}
    assert evaluate_images(images[:30], images[30:60], metrics="fd") == {"fd30_64_random": ev.metrics["fd30_64_random"]}
    rows = [{"round": r, "epsilon": 0.3 * r, "loss_d": 1.0 / r,
             "hospital": {"0": {"epsilon": 0.3 * r, "epsilon_add_remove": 0.2 * r, "delta": 1e-5,
                                "relation": "replace-one", "patient_level": 1.0}}} for r in range(1, 5)]
    path = write_report(tmp_path / "r.html", ev, images[:30], images[60:90], run_rows=rows)
    text = _check_self_contained(path)
    assert "ε per round" in text and "Training curves" in text
    assert "ε per hospital" in text and "<td>0</td><td>1.2</td><td>0.8</td><td>1e-05</td><td>replace-one patient" in text


@pytest.mark.parametrize(
    "case,expect",
    [
        ("empty", "no images"),
        ("mismatch", "differ in resolution"),
        ("both", "exactly one of"),
    ],
)
def test_bad_input_is_one_line(sets, tmp_path, case, expect):
    empty = tmp_path / "empty"
    empty.mkdir()
    small = _write_pngs(tmp_path / "small", sets["images"][:5, ::2, ::2])
    args = {
        "empty": ["--fake", str(empty)],
        "mismatch": ["--fake", str(small)],
        "both": ["--fake", str(sets["fake"]), "--checkpoint", str(tmp_path)],
    }[case]
    proc = _cli(*args, "--real", str(sets["real"]), "--out", str(tmp_path / "out"), tmp=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and expect in proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if "error:" in ln]) == 1


def test_partial_evaluation_keeps_what_it_computed(sets, tmp_path):
    one = _write_pngs(tmp_path / "one", sets["images"][:1])
    out = tmp_path / "out"
    proc = _cli("--fake", str(one), "--real", str(sets["real"]), "--train", str(sets["train"]), "--metrics", "kid,nn",
                "--out", str(out), tmp=tmp_path)
    assert proc.returncode == 2 and "KID needs at least 2 images" in proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert "ssim_nn_train" in metrics and not any(k.startswith("kid") for k in metrics)
    assert (out / "report.html").is_file()


@pytest.mark.slow
def test_missing_inception_weights_names_the_file(sets, tmp_path):
    out = tmp_path / "out"
    proc = _cli("--fake", str(sets["fake"]), "--real", str(sets["real"]), "--train", str(sets["train"]),
                "--metrics", "fd,nn", "--feature-extractor", "inception", "--out", str(out), tmp=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "pt_inception-2015-12-05-6726825d.pth" in proc.stderr.replace("\n", "")
    assert "ssim_nn_train" in json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_evaluate_run_directory_with_snapshots_ppl_logan_and_epsilon(sets, tmp_path):
    import torch

    from medsyngan.config import load_config
    from medsyngan.models.registry import build_discriminator, build_generator
    from medsyngan.rundir import RunDir
    from medsyngan.training.checkpoint import save_checkpoint_files

    cfg = load_config(None, ["model.ngf=8", "model.ndf=8", "run.name=tiny"])
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.config_path.write_text(cfg.to_toml())
    torch.manual_seed(0)
    G, D = build_generator(cfg.model), build_discriminator(cfg.model)
    for step in (10, 20):
        tensors = {**{f"G.{k}": v for k, v in G.state_dict().items()}, **{f"D.{k}": v for k, v in D.state_dict().items()}}
        meta = {"arch": "dcgan", "resolution": 64, "z_dim": cfg.model.z_dim, "step": step, "kimg": step * 0.064,
                "config_toml": cfg.to_toml(), "parts": ["G", "D"]}
        save_checkpoint_files(run.checkpoints, f"step-{step:06d}", tensors, meta)
    for r in (1, 2, 3):
        run.append_metrics({"round": r, "epsilon": 0.4 * r, "delta": 1e-5, "loss_g": 1.0})
    out = tmp_path / "out"
    proc = _cli("--run", str(run.root), "--real", str(sets["real"]), "--train", str(sets["train"]), "--count", "120",
                "--snapshot-count", "20", "--ppl-samples", "200", "--out", str(out), tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert "ppl_zfull200_64_randomfeat" in metrics and "mia_logan_auc" in metrics
    assert metrics["dp_epsilon"] == pytest.approx(1.2) and metrics["dp_delta"] == pytest.approx(1e-5)
    details = json.loads((out / "evaluation.json").read_text())
    assert [row["step"] for row in details["snapshots"]] == [10, 20]
    text = _check_self_contained(out / "report.html")
    assert "Snapshots" in text and "ε per round" in text
