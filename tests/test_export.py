"""`medsyngan export`: a shareable generator and nothing else. Every byte it writes is searched for what must stay
behind (the DP seed, keys, the discriminator, optimizer moments, the released mean image, local paths), and the
exported folder generates exactly the images of the run's own generator."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medsyngan.cli import app
from medsyngan.config import Config, Section, config_from_toml_text
from medsyngan.errors import UserError
from medsyngan.rundir import RunDir
from medsyngan.sealed import generate_key_file
from medsyngan.training.checkpoint import load_checkpoint, weights_bytes
from medsyngan.training.generate import generate_images, load_generator
from medsyngan.workflows.export import SHAREABLE_TEXT, export_model, shareable_config

from dp_run import MODEL_ONLY, train_dp_run

EXPORTED = {"model.safetensors", "config.toml", "model-card.json", "MODEL_CARD.md", "samples.png"}


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def sealed_dp_run(tmp_path_factory):
    """A DP run with an EMA generator, a released mean image, and every checkpoint sealed under a key file."""
    root = tmp_path_factory.mktemp("export")
    generate_key_file(root / "hospital.key")
    run = train_dp_run(root / "run", "train.ema_kimg=0.05", "privacy.mean_image_size=4",
                       f"privacy.checkpoint_key={root / 'hospital.key'}")
    return root, run


def _what_must_stay_behind(root, run: RunDir) -> dict[str, bytes]:
    """Byte strings taken from the run's own checkpoint and files: none may be in the export."""
    ckpt = load_checkpoint(run.root)
    seed = ckpt.secret()["dp"]["sampler"]["seed"]
    needles = {"DP seed (decimal)": str(seed).encode(), "DP seed (bytes)": struct.pack("<Q", seed),
               "key file": (root / "hospital.key").read_bytes(), "key path": str(root / "hospital.key").encode(),
               "run path": str(run.root).encode(), "tmp root": str(root).encode()}
    for name, tensor in ckpt.part("D").items():
        if tensor.numel() >= 16:
            needles[f"D {name}"] = _raw(tensor)[:64]
    state = ckpt.training_state()
    for opt in ("opt_g", "opt_d"):
        for index, moments in state[opt]["state"].items():
            for moment, tensor in moments.items():
                if tensor.numel() >= 16:
                    needles[f"{opt} {index} {moment}"] = _raw(tensor)[:64]
    target = ckpt.meta["dp"]["mean_image"]["target"]
    needles["mean image (float32)"] = struct.pack("<4f", *target[:4])
    needles["mean image (text)"] = repr(target[0]).encode()
    return needles


def test_export_writes_the_generator_and_a_model_card_and_nothing_secret(sealed_dp_run):
    root, run = sealed_dp_run
    out = root / "model"
    card = export_model(run.root, out)
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert set(files) == EXPORTED and all(p.is_file() for p in out.rglob("*"))

    needles = _what_must_stay_behind(root, run)
    kinds = {name.split()[0] for name in needles}
    assert {"D", "opt_g", "opt_d", "DP", "mean", "key"} <= kinds and all(len(n) >= 8 for n in needles.values())
    # The needles are real: the run's checkpoint, written in plaintext, holds them.
    ckpt, buf = load_checkpoint(run.root), io.BytesIO()
    torch.save(ckpt.training_state(), buf)
    plain = (weights_bytes(ckpt.tensors, ckpt.meta) + buf.getvalue() + json.dumps(ckpt.meta).encode()
             + json.dumps(ckpt.secret()).encode())
    for name, needle in needles.items():
        if name.split()[0] in ("D", "opt_g", "opt_d") or name.endswith("(decimal)") or name.endswith("(text)"):
            assert needle in plain, name
    for name, needle in needles.items():
        for file, data in files.items():
            assert needle not in data, f"{name} found in exported {file}"

    # What it does hold: the EMA generator, bit for bit, and the card's figures from the run's accountant.
    G_run, meta = load_generator(run.root)
    assert meta["generator_part"] == "G_ema"
    weights = load_checkpoint(out).tensors
    assert set(weights) == {f"G.{k}" for k in G_run.state_dict()}
    assert all(torch.equal(weights[f"G.{k}"], v) for k, v in G_run.state_dict().items())
    assert _raw(G_run.state_dict()["main.0.weight"])[:64] in files["model.safetensors"]
    (guarantee,) = card["privacy"]["guarantees"]
    accountant = meta["dp"]["accountant"]
    assert guarantee["unit"] == "patient" and guarantee["units"] == 40 and 0 < guarantee["epsilon"] <= 5
    assert guarantee["delta"] == accountant["delta"] and guarantee["relation"]
    assert card["training_data"]["privacy_units"] == {"unit": "patient", "count": 40}
    assert json.loads(files["model-card.json"]) == card
    assert f"ε = {guarantee['epsilon']:.3f}" in files["MODEL_CARD.md"].decode()
    assert files["samples.png"].startswith(b"\x89PNG")

    cfg = config_from_toml_text(files["config.toml"].decode(), "exported config.toml")
    assert cfg.privacy.checkpoint_key == "" and cfg.model == load_checkpoint(run.root).config().model


def test_generate_reads_the_exported_model_as_it_reads_the_run(sealed_dp_run, tmp_path):
    root, run = sealed_dp_run
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["export", "--run", str(run.root), "--out", str(out),
                                      "--description", "phantoms for a test"])
    assert result.exit_code == 0, result.output
    assert "ε = " in result.output and "per patient" in result.output
    G_model, _ = load_generator(out)
    G_run, _ = load_generator(run.root)
    assert np.array_equal(generate_images(G_model, 8, seed=3), generate_images(G_run, 8, seed=3))
    result = CliRunner().invoke(app, ["generate", "--checkpoint", str(out), "--out", str(tmp_path / "png"),
                                      "-n", "3"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "png").glob("*.png"))) == 3
    assert json.loads((out / "model-card.json").read_text())["training_data"]["description"] == "phantoms for a test"

    with pytest.raises(UserError, match="exists and is not an empty folder") as info:
        export_model(run.root, out)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="is not a run directory"):
        export_model(tmp_path, tmp_path / "elsewhere")


def test_a_run_without_dp_exports_with_a_card_that_says_so(tmp_path, medsyngan_cache):
    from medsyngan.config import load_config
    from medsyngan.workflows.centralized import train_centralized

    cfg = load_config("dcgan64", MODEL_ONLY + ["data.phantom_patients=8", "train.steps=1", "train.sample_every=100"])
    run = RunDir(tmp_path / "run").create(cfg)
    train_centralized(cfg, run)
    card = export_model(run.root, tmp_path / "model")
    assert card["privacy"] == {"differential_privacy": False, "guarantees": []}
    assert card["training_data"]["privacy_units"] is None and card["model"]["weights"] == "generator"
    assert "No differential privacy" in (tmp_path / "model" / "MODEL_CARD.md").read_text()


def test_every_text_setting_is_either_shareable_or_removed():
    """A setting added later that names a file is removed from exports unless it is declared shareable."""
    cfg = Config()
    text = []

    def walk(section: Section, prefix: str) -> None:
        for name, field in type(section).model_fields.items():
            value = getattr(section, name)
            if isinstance(value, Section):
                walk(value, prefix + name + ".")
            elif field.annotation is str:
                text.append(prefix + name)

    walk(cfg, "")
    assert SHAREABLE_TEXT <= set(text)
    paths = {"data.path": "/hospital/data", "train.init_from": "/hospital/runs/a",
             "train.label_table": "/hospital/Data_Entry_2017_v2020.csv",
             "federated.partition": "/hospital/p.csv", "privacy.checkpoint_key": "/hospital/k.key",
             "eval.feature_extractor": "/hospital/inception.pt"}
    assert set(text) - SHAREABLE_TEXT == set(paths)
    dirty = cfg.model_copy(deep=True)
    for path, value in paths.items():
        section, name = path.split(".")
        setattr(getattr(dirty, section), name, value)
    clean = shareable_config(dirty)
    assert "/hospital" not in clean.to_toml() and clean == Config()
    dirty.eval.feature_extractor = "inception"
    assert shareable_config(dirty).eval.feature_extractor == "inception"


def test_a_federation_s_card_takes_each_hospital_s_reported_epsilon_and_the_server_accountant(tmp_path):
    from medsyngan.privacy.accounting import client_level_accountant
    from medsyngan.workflows.export import privacy_record

    run = RunDir(tmp_path)
    for round_, eps in ((1, (0.3, 0.5)), (2, (0.6, 0.9))):
        run.append_metrics({"round": round_, "hospital": {
            "0": {"epsilon": eps[0], "delta": 1e-5, "patient_level": 1.0},
            "1": {"epsilon": eps[1], "delta": 1e-5, "patient_level": 1.0}}})
    server = client_level_accountant(1.0, 2)
    server.step(2)
    record = privacy_record(run, {"client_dp_accountant": server.state_dict()})
    hospitals, clients = record["guarantees"]
    assert hospitals["unit"] == "patient" and hospitals["epsilon"] == 0.9
    assert hospitals["per_hospital"] == {"0": 0.6, "1": 0.9}
    assert clients["unit"] == "hospital" and clients["units"] == 2
    assert clients["epsilon"] == server.epsilon()["reported"] and clients["accounted_steps"] == 2
