"""``export_model``: a trained run's generator as a folder that may leave the hospital, and nothing else.

Layout of an exported model::

    MODEL/
      model.safetensors   the generator's weights, as "G." tensors: the EMA when the run kept one, else G; its
                          header names the architecture and carries the shareable configuration, so that
                          `medsyngan generate --checkpoint MODEL` (and `evaluate`) read the folder as they read a run
      config.toml         the run's configuration with every local path and secret removed (:func:`shareable_config`)
      model-card.json     what the model is, what it was trained on, its privacy guarantee, intended use and
                          limitations, the SHA-256 of the files above
      MODEL_CARD.md       the same for people
      samples.png         64 images from fixed latents (seed 0)

What stays behind: the discriminator (it is fitted to the training images and is the tool of membership
attacks), optimizer moments, RNG states, the data loader's position, the DP state (the secret seed and sampler,
the accountant, the released mean image), metrics and logs, key files, and every path of the machine it was
trained on. The folder is assembled under a temporary name and renamed into place, so a failed export leaves
nothing that looks like a model.

Counts of training data are given as the DP accountant records them — privacy units (patients or images), which
the threat model treats as public (a hospital's patient count sets its sampling rate and its FedAvg weight). A run
without DP makes no promise about its data, so its card gives no counts and says that the generator may
reproduce training images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medsyngan.config import Config, Section, config_from_toml_text
from medsyngan.errors import UserError
from medsyngan.privacy.accounting import RELATION, format_epsilon
from medsyngan.rundir import RunDir

log = logging.getLogger("medsyngan")

CARD_FORMAT = 1
CARD_MD = "MODEL_CARD.md"
CONFIG_FILE = "config.toml"
SAMPLES_FILE = "samples.png"
# Plain text settings that name nothing on the machine and hold no secret; every other `str` setting (data.path,
# train.init_from, federated.partition, privacy.checkpoint_key, and any added later) is reset to its default.
SHAREABLE_TEXT = frozenset({"run.name", "eval.metrics"})
BUILTIN_EXTRACTORS = ("inception", "random")  # eval.feature_extractor: anything else is a file path
INTENDED_USE = [
    "Research on synthetic chest X-rays: method development, augmentation studies, teaching.",
    "Sharing a generator where the training images themselves may not be shared, within the privacy guarantee "
    "stated in this card.",
]
LIMITATIONS = [
    "Not for diagnosis or any clinical decision: the images are synthetic and no finding in them is real.",
    "The generator reproduces the distribution of its training data, with its biases (scanners, patient "
    "population, label noise), at the stated resolution only.",
    "Image quality and diversity are those measured for the run (see its report), not guaranteed.",
    "The privacy guarantee covers every discriminator update on real data of the stated unit; it does not "
    "cover choices a person made by looking at private outputs, e.g. picking this checkpoint by a metric on real "
    "images.",
]


def shareable_config(cfg: Config) -> Config:
    """``cfg`` with every local path and secret reset to its default: plain text settings are kept only when
    listed in :data:`SHAREABLE_TEXT` (or a built-in feature extractor), so a new path setting is removed too."""

    def clean(section: Section, prefix: str) -> Section:
        updates: dict[str, Any] = {}
        for name, field in type(section).model_fields.items():
            value, path = getattr(section, name), prefix + name
            if isinstance(value, Section):
                updates[name] = clean(value, path + ".")
            elif field.annotation is str and path not in SHAREABLE_TEXT and not (
                    path == "eval.feature_extractor" and value in BUILTIN_EXTRACTORS):
                updates[name] = field.get_default(call_default_factory=True)
        return section.model_copy(update=updates)

    return clean(cfg, "")  # type: ignore[return-value]


def privacy_record(run: RunDir, meta: dict[str, Any]) -> dict[str, Any]:
    """The run's privacy guarantees from its records: the checkpoint's accountant (centralized DP-SGD, client-level
    DP) and the ε each hospital reported in the metrics log (federated DP-SGD; the worst hospital's applies to
    every patient). Each guarantee names its unit (patient, image or hospital), ε, δ and relation."""
    from medsyngan.privacy.accounting import PrivacyAccountant

    def accountant(state: dict[str, Any], source: str) -> dict[str, Any]:
        acc = PrivacyAccountant.from_state_dict(state)
        return {"unit": acc.unit, "units": acc.units, "epsilon": acc.epsilon()["reported"], "delta": acc.delta,
                "relation": RELATION, "accounted_steps": acc.steps, "source": source}

    guarantees = []
    if "dp" in meta:
        guarantees.append(accountant(meta["dp"]["accountant"], "the checkpoint's DP-SGD accountant"))
    reported: dict[str, dict[str, Any]] = {}
    for row in run.read_metrics():
        for hospital, stats in row.get("hospital", {}).items():
            if isinstance(stats.get("epsilon"), (int, float)):
                reported[hospital] = stats
    if reported:
        worst = max(reported.values(), key=lambda s: s["epsilon"])
        guarantees.append({
            "unit": "patient" if worst.get("patient_level") else "image", "units": None,
            "epsilon": float(worst["epsilon"]), "delta": float(worst["delta"]), "relation": RELATION,
            "per_hospital": {h: float(s["epsilon"]) for h, s in sorted(reported.items(), key=lambda kv: int(kv[0]))},
            "source": "the ε each hospital reported for its own DP-SGD (the largest applies to every patient)",
        })
    if "client_dp_accountant" in meta:
        guarantees.append(accountant(meta["client_dp_accountant"], "the server's client-level DP accountant"))
    # A guarantee of ε = ∞ (a clipping-only run) is none: such a card says the model has no differential privacy.
    private = bool(guarantees) and all(math.isfinite(g["epsilon"]) for g in guarantees)
    return {"differential_privacy": private, "guarantees": guarantees}


def _training_data(cfg: Config, privacy: dict[str, Any], description: str | None) -> dict[str, Any]:
    counted = next((g for g in privacy["guarantees"] if g["unit"] != "hospital" and g["units"]), None)
    default = ("procedurally generated phantom chest images (no patient data)" if cfg.data.source == "phantoms"
               else "a prepared chest X-ray dataset (describe it with --description)")
    return {
        "description": description or default,
        "source": cfg.data.source,
        "federated": cfg.federated.enabled,
        "hospitals": cfg.federated.hospitals if cfg.federated.enabled else 1,
        "privacy_units": {"unit": counted["unit"], "count": counted["units"]} if counted else None,
    }


def _card_markdown(card: dict[str, Any]) -> str:
    m, data, privacy = card["model"], card["training_data"], card["privacy"]
    lines = [f"# Model card: {card['name']}", "",
             f"A {m['architecture']} generator of {m['resolution']}×{m['resolution']} synthetic chest X-rays, "
             f"exported by MedSynGAN {card['product']['version']} on {card['exported'][:10]} "
             f"(weights: {m['weights']}, {m['parameters']:,} parameters, trained {m['trained'][:10]}, "
             f"{m['kimg']:.1f} kimg).", "", "## Training data", "", f"- {data['description']}",
             f"- Source: `{data['source']}`" + (f", federated across {data['hospitals']} hospitals"
                                                 if data["federated"] else "")]
    if data["privacy_units"]:
        lines.append(f"- {data['privacy_units']['count']} {data['privacy_units']['unit']}s (privacy units)")
    lines += ["", "## Privacy", ""]
    if not privacy["differential_privacy"]:
        lines.append("- **No differential privacy.** Nothing bounds what the generator reveals about its training "
                     "images: it may reproduce them. Share it only where the training images could be shared.")
    for g in privacy["guarantees"]:
        lines.append(f"- (ε = {format_epsilon(g['epsilon'], '.3f')}, δ = {g['delta']:.2g})-DP for each {g['unit']}, "
                     f"neighbouring relation {g['relation']} {g['unit']}; from {g['source']}.")
        for hospital, eps in g.get("per_hospital", {}).items():
            lines.append(f"  - hospital {hospital}: ε = {format_epsilon(eps, '.3f')}")
    lines += ["", "## Intended use", "", *[f"- {u}" for u in card["intended_use"]], "", "## Limitations", "",
              *[f"- {u}" for u in card["limitations"]], "", "## Files", "",
              *[f"- `{name}` (SHA-256 {digest})" for name, digest in card["files"].items()], "",
              f"![samples]({SAMPLES_FILE})", ""]
    return "\n".join(lines)


def export_model(run_dir: Path | str, out: Path | str, key: bytes | None = None,
                 description: str | None = None) -> dict[str, Any]:
    """Write the shareable model of the run's latest checkpoint to ``out`` (a new or empty folder) and return its
    model card. ``key`` opens a sealed checkpoint (default: the run's own); ``description`` describes the training
    data in the card."""
    import torch

    from medsyngan import __version__
    from medsyngan.training.checkpoint import MODEL_CARD_JSON, WEIGHTS_FILE, weights_bytes
    from medsyngan.training.generate import fixed_latents, load_generator, sample_grid_png

    run, out = RunDir(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; choose a new --out for the exported model")
    if not run.config_path.is_file():
        raise UserError(f"{run.root} is not a run directory (no config.toml); pass the folder given to train --out")
    G, meta = load_generator(run.root, "cpu", key)
    cfg = shareable_config(config_from_toml_text(meta["config_toml"], f"{meta['checkpoint']} (configuration)"))
    weights = {f"G.{k}": v for k, v in G.state_dict().items()}
    step, kimg = int(meta.get("step", meta.get("round", 0))), float(meta.get("kimg", 0.0))
    header = {"format": meta.get("format"), "arch": cfg.model.arch, "resolution": cfg.model.resolution,
              "z_dim": cfg.model.z_dim, "step": step, "kimg": kimg, "parts": ["G"], "config_toml": cfg.to_toml()}
    if meta.get("labels"):  # a conditional model's label frequencies (public, DP-released, or of a non-private run)
        header["labels"] = meta["labels"]
    privacy = privacy_record(run, meta)
    if not privacy["differential_privacy"]:
        log.warning("%s was trained without differential privacy: its generator may reproduce training images; "
                    "the model card says so", run.root)
    files = {WEIGHTS_FILE: weights_bytes(weights, header), CONFIG_FILE: cfg.to_toml().encode(),
             SAMPLES_FILE: sample_grid_png(G, fixed_latents(G.z_dim, 0))}
    card = {
        "format": CARD_FORMAT,
        "name": cfg.run.name,
        "product": {"name": "MedSynGAN", "version": __version__},
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"architecture": cfg.model.arch, "resolution": cfg.model.resolution, "z_dim": cfg.model.z_dim,
                  "weights": "EMA of the generator" if meta["generator_part"] == "G_ema" else "generator",
                  "step": step, "kimg": kimg,
                  "parameters": int(sum(t.numel() for t in weights.values() if torch.is_floating_point(t))),
                  "trained": datetime.fromtimestamp(float(meta.get("created", 0.0)), timezone.utc)
                  .isoformat(timespec="seconds")},
        "training_data": _training_data(cfg, privacy, description),
        "privacy": privacy,
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
    }
    files[MODEL_CARD_JSON] = (json.dumps(card, indent=2) + "\n").encode()
    files[CARD_MD] = _card_markdown(card).encode()
    _write_folder(out, files)
    return card


def _write_folder(out: Path, files: dict[str, bytes]) -> None:
    """``files`` into a new folder ``out``, assembled beside it and renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        os.chmod(tmp, 0o755)
        if out.exists():
            out.rmdir()  # empty, checked before
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
