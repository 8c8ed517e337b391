"""``evaluate_run``: the one way a trained run is scored (the CLI's ``evaluate --run``, the demo and the study).

The latent seed rule: an evaluation at seed ``s`` (by default the run's ``run.seed``) generates from latents
drawn with seed ``s + 1000`` — never the latents the run drew while training, which its generator has been fitted
to — and seeds every random subset of the metrics (KID subsets, MS-SSIM pairs, attacks) with ``s``.

``utility=True`` adds what a hospital asks beyond a distance (:data:`UTILITY_METRICS`): train-synthetic-test-real
utility, the classifier two-sample test and the re-identification audit. The synthetic films of a conditional
generator are labelled with the labels they were generated from (drawn as ``generate`` draws them, with the same
latent seed); the real sets' labels are their findings, views and sexes (:func:`label_matrix`); the verifier of
the re-identification audit trains on the public COVID-19 films at the run's resolution
(:func:`~medsyngan.data.api.covid_dataset`) and is left out, with its reason, when they are not there.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from medsyngan.errors import UserError
from medsyngan.rundir import RunDir, atomic_write_text

if TYPE_CHECKING:
    from medsyngan.metrics import Evaluation

log = logging.getLogger("medsyngan")

LATENT_SEED_OFFSET = 1000
UTILITY_METRICS = ("utility", "detectability", "reidentification")


class Images(Protocol):
    """What an image set offers an evaluation: a prepared dataset, or an ImageSet read from a folder (a prepared
    set also offers per-film ``labels`` (findings), ``views`` and ``sexes``, which utility needs)."""

    images: np.ndarray
    patients: np.ndarray | None


def latent_seed(seed: int) -> int:
    """The seed of an evaluation's latents (see the module docstring)."""
    return seed + LATENT_SEED_OFFSET


def label_matrix(images: Images, role: str) -> tuple[tuple[str, ...], np.ndarray]:
    """Utility's label names and [N, C] matrix (view, sex, any finding, each NIH finding) of a real set."""
    from medsyngan.metrics.utility import binary_targets

    findings = getattr(images, "labels", None)
    if findings is None:
        raise UserError(f"--utility needs the labels of the {role} films: give a prepared dataset (from `medsyngan "
                        "data prepare`), not a folder of images")
    return binary_targets(findings, getattr(images, "views", None), getattr(images, "sexes", None))


def generated_labels(G: torch.nn.Module, count: int, seed: int) -> tuple[torch.Tensor, tuple[str, ...], np.ndarray]:
    """The labels a conditional generator's ``count`` evaluation films are generated from (as
    :func:`~medsyngan.training.generate.generate_images` draws them at ``seed``), and the same as utility's names
    and matrix; a group the model is not conditioned on is unknown (NaN) there."""
    from medsyngan.metrics.utility import binary_targets
    from medsyngan.training.generate import label_layout, request_labels

    layout = label_layout(G)
    if not layout.groups:
        raise UserError("--utility trains classifiers on labelled synthetic films: it needs a class-conditional "
                        "model (train with model.condition = [\"findings\", \"view\", \"sex\"])")
    labels = request_labels(G, count, seed)
    decoded = [layout.decode(v) for v in labels.numpy()]
    names, matrix = binary_targets([d.get("findings", ()) for d in decoded], [d.get("view", "") for d in decoded],
                                   [d.get("sex", "") for d in decoded])
    if "findings" not in layout.groups:
        matrix[:, names.index("any_finding"):] = np.nan
    return labels, names, matrix


def public_verifier_films(resolution: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The public COVID-19 films and patient ids at ``resolution`` for the re-identification verifier, or
    (None, None) with the reason logged when they are not there (the audit is then reported as not computed)."""
    from medsyngan.data.api import covid_dataset

    try:
        public = covid_dataset(resolution)
    except UserError as exc:
        log.warning("re-identification verifier: %s", exc)
        return None, None
    return np.asarray(public.images), np.array([f"covid:{p}" for p in public.patients])


@dataclass
class RunEvaluation:
    evaluation: Evaluation
    images: np.ndarray  # the synthetic images scored
    seed: int  # the evaluation seed (latents drawn with latent_seed(seed))
    epsilon: float | None
    delta: float | None
    meta: dict[str, Any] = field(default_factory=dict)  # the checkpoint's metadata (its path, the generator part)
    notes: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, float]:
        return self.evaluation.metrics


def evaluate_run(
    run_dir: Path | str,
    real: Images,
    train: Images | None = None,
    *,
    metrics: str | None = None,
    feature_extractor: Any = None,
    num_samples: int | None = None,
    seed: int | None = None,
    epsilon: float | None = None,
    delta: float | None = None,
    nn_threshold: float | None = None,
    attack_discriminator: bool = False,
    msssim_pairs: int = 500,
    ppl_samples: int = 500,
    out: Path | None = None,
    key: bytes | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    utility: bool = False,
) -> RunEvaluation:
    """Score a run's generator (its EMA when the run kept one) against ``real`` (images it never trained on) and
    ``train`` (its training images, for the memorization and membership audits); write ``metrics.json`` to
    ``out`` (default: the run folder) and return the evaluation with the images.

    Defaults come from the run's configuration: ``eval.metrics``, ``eval.feature_extractor``,
    ``eval.num_samples``, ``eval.nn_threshold``, and ``run.seed`` as the evaluation seed; ε and δ from its
    metrics log. ``attack_discriminator`` adds the LOGAN attack with the run's discriminator; ``utility`` the
    metrics of :data:`UTILITY_METRICS` (see the module docstring)."""
    from medsyngan.metrics import evaluate
    from medsyngan.metrics.evaluate import privacy_from_rows
    from medsyngan.training.generate import generate_images, load_generator

    rd = RunDir(run_dir)
    cfg = rd.load_config()
    seed = cfg.run.seed if seed is None else seed
    count = num_samples or cfg.eval.num_samples
    G, meta = load_generator(rd.root, device, key)
    metrics = metrics or cfg.eval.metrics
    labelled: dict[str, Any] = {}
    fake_labels = None
    if utility:
        metrics = ",".join([metrics, *UTILITY_METRICS])
        fake_labels, names, labelled["fake_labels"] = generated_labels(G, count, latent_seed(seed))
        labelled["label_names"] = names
        labelled["real_labels"] = label_matrix(real, "--real")[1]
        if train is not None:
            labelled["train_labels"] = label_matrix(train, "--train")[1]
        labelled["verifier_images"], labelled["verifier_patients"] = public_verifier_films(cfg.model.resolution)
    fake = generate_images(G, count, latent_seed(seed), batch_size=batch_size, device=device, labels=fake_labels)
    logged_eps, logged_delta = privacy_from_rows(rd.read_metrics())
    epsilon = logged_eps if epsilon is None else epsilon
    delta = logged_delta if delta is None else delta
    discriminator = load_attack_discriminator(Path(meta["checkpoint"]), device, key) if attack_discriminator else None
    ev = evaluate(
        fake, np.asarray(real.images), None if train is None else np.asarray(train.images),
        metrics=metrics, feature_extractor=feature_extractor or cfg.eval.feature_extractor,
        generator=G, discriminator=discriminator, epsilon=epsilon, delta=delta, real_patients=real.patients,
        train_patients=None if train is None else train.patients,
        nn_threshold=cfg.eval.nn_threshold if nn_threshold is None else nn_threshold,
        msssim_pairs=msssim_pairs, ppl_samples=ppl_samples,
        batch_size=batch_size, seed=seed, device=device, **labelled,
    )
    require_some_metric(ev)
    atomic_write_text((out or rd.root) / "metrics.json", json.dumps(ev.metrics, indent=2) + "\n")
    note = (f"synthetic images: {count} from {meta['checkpoint']} ({meta['generator_part']}), latent seed "
            f"{latent_seed(seed)}")
    return RunEvaluation(ev, fake, seed, epsilon, delta, meta, [note])


def require_some_metric(ev: Evaluation) -> None:
    """An evaluation that computed nothing is an error, never an empty metrics.json."""
    if not ev.metrics:
        reasons = "; ".join(f"{group} ({reason})" for group, reason in ev.skipped.items()) or "no metric requested"
        raise UserError(f"no metric could be computed: {reasons}")


def load_attack_discriminator(checkpoint: Path, device: torch.device | str = "cpu", key: bytes | None = None):
    """The run's discriminator for the LOGAN attack, or None (with the reason logged) when it cannot be built."""
    from medsyngan.models.registry import build_discriminator
    from medsyngan.training.checkpoint import load_checkpoint

    try:
        ckpt = load_checkpoint(checkpoint, key)
        D = build_discriminator(ckpt.config().model)
        state = {k.removeprefix("_module."): v for k, v in ckpt.part("D").items()}
        if not state:
            raise UserError("the checkpoint holds no discriminator")
        D.load_state_dict(state)
        return D.to(device).eval().requires_grad_(False)
    except (UserError, RuntimeError) as exc:
        log.warning("LOGAN attack skipped: %s", str(exc).splitlines()[0])
        return None


def hospital_table(run_dir: RunDir) -> list[dict[str, Any]]:
    """Per hospital of a federated run: training images, ε spent as its own ledger reported it in the last round it
    trained in (replace-one, with the add/remove-one figure and the unit), bytes it sent."""
    table: dict[str, dict[str, Any]] = {}
    for row in run_dir.read_metrics():
        for hospital, stats in row.get("hospital", {}).items():
            entry = table.setdefault(hospital, {"hospital": int(hospital), "images": 0, "epsilon": None,
                                                "bytes_sent": 0, "rounds": 0})
            entry["images"] = int(stats.get("train_images", 0))
            entry["epsilon"] = stats.get("epsilon", entry["epsilon"])
            if "epsilon" in stats:
                entry["epsilon_add_remove"] = stats.get("epsilon_add_remove")
                entry["unit"] = "patient" if stats.get("patient_level") else "image"
                entry["relation"] = stats.get("relation")
                entry["delta"] = stats.get("delta")
            entry["bytes_sent"] += int(stats.get("bytes_received_from", 0))
            entry["rounds"] += 1
    return [table[k] for k in sorted(table, key=int)]


def images_seen(run_dir: RunDir) -> int:
    """Real images the run pushed through D, from its metrics log."""
    return int(round(max((r.get("kimg", 0.0) for r in run_dir.read_metrics()), default=0.0) * 1000))
