"""`medsyngan demo`: the whole system in one command, on built-in phantoms (or a user's prepared dataset).

1. Data: phantom patients in the NIH layout with an official-style train_val / test split (test = evaluation
   patients, never trained on), hospitals by a patient-disjoint label-skew partition.
2. A public model: the same network trained without privacy on public data — phantoms of other, freshly drawn
   patients — which costs no privacy budget. DP-SGD at ε = 1 on a few hundred patients per hospital cannot teach
   a discriminator anatomy from scratch (its noise swamps the signal), so the hospitals start from it.
3. Federated training (Flower simulation) from the public model: DCGAN-64, patient-level DP-SGD at ε = 1 on the
   discriminator's last layer in every hospital (``FINE_TUNING``), 8-bit updates, AES-256-GCM to the aggregator,
   secure aggregation.
4. The reference: the same model trained centrally from the same start with the same settings, without privacy,
   on the same images for the same number of images through D — what federation and privacy cost.
5. Evaluation of all three against the test patients (random-feature FD/KID, precision/recall, density/coverage,
   nearest-neighbour SSIM/PSNR/MSE, MS-SSIM diversity, memorization and membership-inference audit) and one report;
   the public model's column shows what the hospitals' private data added.

This module is a composition root like ``cli``: it may call every layer.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsyngan.config import Config, load_config
from medsyngan.errors import UserError
from medsyngan.rundir import RunDir, atomic_write_text, console, setup_logging

log = logging.getLogger("medsyngan")

PRESET = "demo"
# About a minute after set-up: tiny phantoms, a narrow network and a few short rounds; same pipeline.
QUICK = [
    "data.phantom_patients=90", "data.phantom_images_per_patient=2",
    "model.ngf=16", "model.ndf=16", "train.batch_size=8",
    "federated.rounds=3", "federated.local_steps=5", "federated.eval_every=3",
    "eval.num_samples=200",
]


@dataclass
class RunOutcome:
    name: str
    run_dir: RunDir
    wall_s: float
    metrics: dict[str, float] = field(default_factory=dict)


def demo_config(quick: bool, data: Path | None, overrides: list[str]) -> Config:
    extra = list(QUICK if quick else [])
    if data is not None:
        extra += ['data.source="prepared"', f"data.path={json.dumps(str(Path(data).resolve()))}"]
    return load_config(PRESET, extra + overrides)


def centralized_twin(cfg: Config, images_through_d: int) -> Config:
    """The same model and settings without federation or privacy, for the same number of images through D."""
    twin = cfg.model_copy(deep=True)
    twin.run.name = f"{cfg.run.name}-centralized"
    twin.federated.enabled = False
    twin.privacy.dp = False
    twin.train.steps = max(1, round(images_through_d / cfg.train.batch_size / cfg.train.d_steps_per_g))
    twin.train.checkpoint_every = twin.train.steps
    twin.train.sample_every = max(1, twin.train.steps // 4)
    return twin


# Public phantoms are drawn with another seed than the hospitals' patients: other anatomy, other findings.
PUBLIC_SEED_OFFSET = 1_000_003
# Fine-tuning the public model: DP-SGD on D's last layer only (its noise grows with the number of trained weights),
# a generator 10x slower than D, so that G does not chase a noisy one-layer head into a single mode, and five D
# steps per G step, so that the noisy head has something to say before G moves (Bie et al. 2023). Tuned on real
# X-rays (docs/results.md): with one D step per G step fine-tuning did worse than the public model alone (validation
# FD 18.6 against 13.0), with five it came level (13.8) and beat it on the evaluation patients (13.7 against 15.1);
# the demo's own private run went from FD 10.3 to 2.3 (the public model alone: 1.3).
FINE_TUNING = {"d_trainable_last": 1, "lr_g": 2e-5, "d_steps_per_g": 5}


def public_config(cfg: Config) -> Config:
    """The public model: the twin's recipe on freshly drawn phantoms, for the images the federation plans."""
    f = cfg.federated
    public = centralized_twin(cfg, f.rounds * f.local_steps * cfg.train.batch_size * f.hospitals)
    public.run.name = f"{cfg.run.name}-public"
    public.run.seed = cfg.run.seed + PUBLIC_SEED_OFFSET
    public.data.source, public.data.path, public.data.split = "phantoms", "", "all"
    public.train.init_from = ""
    return public


def fine_tuning_config(cfg: Config, public_run: Path) -> Config:
    """The federation's configuration: every network starts from the public model, trained the FINE_TUNING way.
    A round keeps the private D steps ``cfg`` plans, grouped under fewer G steps (rounded down to whole groups, at
    least one); the privacy plan is computed from the returned configuration, so ε holds either way."""
    tuned = cfg.model_copy(deep=True)
    tuned.train.init_from = str(public_run)
    for key, value in FINE_TUNING.items():
        setattr(tuned.train, key, value)
    d_steps = cfg.federated.local_steps * cfg.train.d_steps_per_g
    tuned.federated.local_steps = max(1, d_steps // tuned.train.d_steps_per_g)
    return tuned


def evaluation_sets(cfg: Config):
    """(train images the runs saw, test patients nobody trained on)."""
    from medsyngan.data.api import load_training_data, select_split

    train = load_training_data(cfg)
    everything = cfg.model_copy(deep=True)
    everything.data.split = "all"
    test = select_split(load_training_data(everything), "test", cfg.data.path or "phantoms")
    return train, test


@dataclass
class Scored:
    evaluation: Any
    fake: np.ndarray
    notes: list[str]


def evaluate_run(outcome: RunOutcome, cfg: Config, train, test) -> Scored:
    """Generate from the run's generator (EMA when kept) and evaluate it against the test patients."""
    from medsyngan.metrics import evaluate
    from medsyngan.metrics.evaluate import privacy_from_rows
    from medsyngan.training.generate import generate_images, load_generator

    G, meta = load_generator(outcome.run_dir.root)
    fake = generate_images(G, cfg.eval.num_samples, seed=cfg.run.seed)
    epsilon, delta = privacy_from_rows(outcome.run_dir.read_metrics())
    ev = evaluate(
        fake, np.asarray(test.images), np.asarray(train.images), metrics=cfg.eval.metrics,
        feature_extractor=cfg.eval.feature_extractor, generator=G, epsilon=epsilon, delta=delta,
        real_patients=test.patients, train_patients=train.patients, nn_threshold=cfg.eval.nn_threshold,
        kid_subset_size=min(1000, len(test), cfg.eval.num_samples), msssim_pairs=500, ppl_samples=500,
        seed=cfg.run.seed,
    )
    outcome.metrics = dict(ev.metrics)
    atomic_write_text(outcome.run_dir.root / "metrics.json", json.dumps(ev.metrics, indent=2) + "\n")
    return Scored(ev, fake, [f"{outcome.name}: generator {meta.get('checkpoint')}, {len(fake)} samples, "
                            f"seed {cfg.run.seed}"])


def write_demo_report(out: Path, fed: RunOutcome, scored: Scored, references: list[RunOutcome], train) -> Path:
    """One report: the federated private run in full, with the reference runs' metrics beside it."""
    from medsyngan.report.html import write_report

    runs = [fed, *references]
    return write_report(
        out / "report.html", scored.evaluation, scored.fake, np.asarray(train.images),
        run_rows=fed.run_dir.read_metrics(), title="MedSynGAN demo — federated, private synthetic chest X-rays",
        notes=scored.notes + ["wall time: " + ", ".join(f"{r.name} {r.wall_s:.0f} s" for r in runs)],
        comparison={r.name: headline_metrics(r.metrics) for r in runs},
    )


def hospital_table(run_dir: RunDir) -> list[dict[str, Any]]:
    """Per hospital: training images, ε spent (the last round it trained in), bytes it sent over the run."""
    rows = [r for r in run_dir.read_metrics() if "hospital" in r]
    table: dict[str, dict[str, Any]] = {}
    for row in rows:
        for hospital, stats in row["hospital"].items():
            entry = table.setdefault(hospital, {"hospital": int(hospital), "images": 0, "epsilon": None,
                                                "bytes_sent": 0, "rounds": 0})
            entry["images"] = int(stats.get("num_examples", 0))
            entry["epsilon"] = stats.get("epsilon", entry["epsilon"])
            entry["bytes_sent"] += int(stats.get("bytes_received_from", 0))
            entry["rounds"] += 1
    return [table[k] for k in sorted(table, key=int)]


HEADLINE = ("fd", "kid", "precision", "recall", "coverage", "msssim", "ssim_nn_train", "mia")


def headline_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The handful of numbers the summary shows (the report has all of them)."""
    chosen = {}
    for key, value in metrics.items():
        if any(key.startswith(prefix) for prefix in HEADLINE) and not key.endswith("_std"):
            chosen[key] = value
    return chosen


def print_summary(runs: list[RunOutcome], hospitals: list[dict[str, Any]], wall_s: float, report: Path) -> None:
    from rich.table import Table

    per = Table(title="hospitals (federated, private)")
    for column in ("hospital", "training images", "rounds", "ε spent", "bytes sent"):
        per.add_column(column, justify="right")
    for h in hospitals:
        eps = "—" if h["epsilon"] is None else f"{h['epsilon']:.3f}"
        per.add_row(str(h["hospital"]), str(h["images"]), str(h["rounds"]), eps, f"{h['bytes_sent'] / 1e6:.2f} MB")
    console.print(per)

    overall = Table(title="what federation and privacy cost")
    overall.add_column("metric")
    for run in runs:
        overall.add_column(run.name, justify="right")
    chosen = [headline_metrics(run.metrics) for run in runs]
    for key in sorted(set().union(*chosen)):
        overall.add_row(key, *(_fmt(m.get(key)) for m in chosen))
    overall.add_row("wall time", *(f"{run.wall_s:.0f} s" for run in runs))
    console.print(overall)
    console.print(f"demo finished in {wall_s:.0f} s; report: {report}")


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def run_demo(out: Path, quick: bool = False, data: Path | None = None, overrides: list[str] | None = None) -> Path:
    """Run the whole demo into ``out``; returns the path of the report."""
    from medsyngan.workflows.federation import train_federated
    from medsyngan.workflows.centralized import train_centralized

    start = time.time()
    out = Path(out)
    if (out / "federated" / "checkpoints").exists():
        raise UserError(f"{out} already holds a demo run; choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out / "demo.log")
    cfg = demo_config(quick, data, overrides or [])
    train, test = evaluation_sets(cfg)
    log.info("demo data: %d training images of %d patients; %d test images of %d patients", len(train),
             len(np.unique(train.patients)), len(test), len(np.unique(test.patients)))

    public_cfg = public_config(cfg)
    public = RunOutcome("public phantoms only", RunDir(out / "public").create(public_cfg), 0.0)
    t0 = time.time()
    train_centralized(public_cfg, public.run_dir)
    public.wall_s = time.time() - t0
    cfg = fine_tuning_config(cfg, public.run_dir.root)

    fed = RunOutcome(f"federated + DP ε={cfg.privacy.target_epsilon:g}" if cfg.privacy.dp else "federated",
                     RunDir(out / "federated").create(cfg), 0.0)
    t0 = time.time()
    train_federated(cfg, fed.run_dir, resume=False)
    fed.wall_s = time.time() - t0
    images = int(round(max(r.get("kimg", 0.0) for r in fed.run_dir.read_metrics()) * 1000))

    twin = centralized_twin(cfg, images)
    central = RunOutcome("centralized, no privacy", RunDir(out / "centralized").create(twin), 0.0)
    t0 = time.time()
    train_centralized(twin, central.run_dir)
    central.wall_s = time.time() - t0
    setup_logging(out / "demo.log")

    log.info("evaluating the three runs against %d test images", len(test))
    scored = evaluate_run(fed, cfg, train, test)
    evaluate_run(central, twin, train, test)
    evaluate_run(public, public_cfg, train, test)
    report = write_demo_report(out, fed, scored, [central, public], train)
    hospitals = hospital_table(fed.run_dir)
    summary = {
        "federated": {"wall_s": fed.wall_s, "metrics": fed.metrics},
        "centralized": {"wall_s": central.wall_s, "metrics": central.metrics, "steps": twin.train.steps},
        "public": {"wall_s": public.wall_s, "metrics": public.metrics, "steps": public_cfg.train.steps},
        "report": str(report),
        "hospitals": hospitals, "images_through_d": images, "wall_s": time.time() - start, "quick": quick,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    print_summary([fed, central, public], hospitals, time.time() - start, report)
    return report
