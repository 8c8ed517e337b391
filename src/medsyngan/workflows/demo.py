"""`medsyngan demo`: the whole system in one command, on built-in phantoms (or a user's prepared dataset).

1. Data: phantom patients in the NIH layout with an official-style train_val / test split (test = evaluation
   patients, never trained on), hospitals by a patient-disjoint label-skew partition.
2. The runs of ``demo-recipes.toml``, in order: a public model trained on freshly drawn phantoms only (public
   data costs no privacy budget); federated training (Flower simulation) from it — DCGAN-64, patient-level DP-SGD
   at ε = 1 on the discriminator's last layer in every hospital, 8-bit updates, AES-256-GCM to the aggregator,
   secure aggregation; and the reference, the same model trained centrally from the same start with the same
   settings, without privacy, for the images through D the federation measured — what federation and privacy cost.
3. Evaluation of all three against the test patients (:func:`~medsyngan.workflows.evaluation.evaluate_run`) and
   one report; the public model's column shows what the hospitals' private data added.
"""

from __future__ import annotations

import json
import logging
import time
import tomllib
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from medsyngan.config import Config, load_config
from medsyngan.errors import UserError
from medsyngan.rundir import RunDir, atomic_write_text, console, setup_logging
from medsyngan.workflows.evaluation import RunEvaluation, evaluate_run, hospital_table, images_seen
from medsyngan.workflows.recipes import (RecipeBook, Schedule, fit_length, flatten, planned_images, recipe_config,
                                         recipes_from_tables)

log = logging.getLogger("medsyngan")

RECIPES = files("medsyngan.workflows") / "demo-recipes.toml"
REPORTED = "federated"  # the run the report shows in full; the others are its references


@dataclass(frozen=True)
class DemoRecipes:
    book: RecipeBook
    quick: list[str]
    schedule: Schedule


def demo_recipes() -> DemoRecipes:
    tree = tomllib.loads(RECIPES.read_text())
    origin = str(RECIPES)
    return DemoRecipes(RecipeBook(recipes_from_tables(tree["recipes"], origin), origin), flatten(tree["quick"]),
                       Schedule(sample_grids=tree["sample_grids"]))


def demo_settings(recipes: DemoRecipes, quick: bool, data: Path | None, overrides: list[str]) -> list[str]:
    """What every run of the demo applies before its recipe: --quick, --data, then --set."""
    extra = list(recipes.quick if quick else [])
    if data is not None:
        extra += ['data.source="prepared"', f"data.path={json.dumps(str(Path(data).resolve()))}"]
    return extra + list(overrides)


def demo_config(recipes: DemoRecipes, settings: list[str]) -> Config:
    """The preset with the demo's settings: the plan that sets every run's images through D."""
    return load_config(recipes.book.preset(REPORTED), settings)


@dataclass
class RunOutcome:
    name: str
    label: str
    run_dir: RunDir
    cfg: Config
    wall_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


def run_config(recipes: DemoRecipes, name: str, settings: list[str], base: Config,
               runs: dict[str, RunOutcome]) -> Config:
    """Recipe ``name`` of the demo, its start and length resolved against the runs already trained."""
    book, recipe = recipes.book, recipes.book[name]
    for ref in (book.start_from(name), recipe.images_from):
        if ref and ref not in runs:
            raise UserError(f"{RECIPES}: recipe '{name}' needs the run of '{ref}', which must come before it")
    start = runs[book.start_from(name)].run_dir.root if book.start_from(name) else None
    cfg = recipe_config(book, name, before=settings, start=start)
    images = images_seen(runs[recipe.images_from].run_dir) if recipe.images_from else planned_images(base)
    cfg = fit_length(cfg, images, recipe.federated_length, recipes.schedule)
    cfg.run.name = base.run.name if name == REPORTED else f"{base.run.name}-{name}"
    return cfg


def run_label(outcome: RunOutcome) -> str:
    dp = outcome.cfg.privacy
    return f"{outcome.label} + DP ε={dp.target_epsilon:g}" if dp.dp else outcome.label


def evaluation_sets(cfg: Config):
    """(train images the runs saw, test patients nobody trained on)."""
    from medsyngan.data.api import load_training_data, select_split

    train = load_training_data(cfg)
    everything = cfg.model_copy(deep=True)
    everything.data.split = "all"
    test = select_split(load_training_data(everything), "test", cfg.data.path or "phantoms")
    return train, test


def write_demo_report(out: Path, reported: RunOutcome, scored: RunEvaluation, references: list[RunOutcome],
                      train) -> Path:
    """One report: the federated private run in full, with the reference runs' metrics beside it."""
    from medsyngan.report.html import write_report

    runs = [reported, *references]
    return write_report(
        out / "report.html", scored.evaluation, scored.images, np.asarray(train.images),
        run_rows=reported.run_dir.read_metrics(), title="MedSynGAN demo — federated, private synthetic chest X-rays",
        notes=[f"{run_label(reported)}: {note}" for note in scored.notes]
        + ["wall time: " + ", ".join(f"{run_label(r)} {r.wall_s:.0f} s" for r in runs)],
        comparison={run_label(r): headline_metrics(r.metrics) for r in runs},
    )


HEADLINE = ("fd", "kid", "precision", "recall", "coverage", "msssim", "ssim_nn_train", "mia")


def headline_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The handful of numbers the summary shows (the report has all of them)."""
    return {key: value for key, value in metrics.items()
            if any(key.startswith(prefix) for prefix in HEADLINE) and not key.endswith("_std")}


def print_summary(runs: list[RunOutcome], hospitals: list[dict[str, Any]], wall_s: float, report: Path,
                  out: Console = console) -> None:
    from rich.table import Table

    units = sorted({h.get("unit", "patient") for h in hospitals if h["epsilon"] is not None}) or ["patient"]
    per = Table(title="hospitals (federated, private)",
                caption=f"ε from each hospital's ledger: replace-one {'/'.join(units)} (add/remove-one)")
    for column in ("hospital", "training images", "rounds", "ε spent", "bytes sent"):
        per.add_column(column, justify="right")
    for h in hospitals:
        eps = "—"
        if h["epsilon"] is not None:
            beside = h.get("epsilon_add_remove")
            eps = f"{h['epsilon']:.3f}" + (f" ({beside:.3f})" if beside is not None else "")
        per.add_row(str(h["hospital"]), str(h["images"]), str(h["rounds"]), eps, f"{h['bytes_sent'] / 1e6:.2f} MB")
    out.print(per)

    chosen = [headline_metrics(run.metrics) for run in runs]
    keys = sorted(set().union(*chosen))
    overall = Table(title="what federation and privacy cost")
    # Metric names are what a reader looks up in the report: the run columns wrap their headings instead.
    overall.add_column("metric", no_wrap=True, min_width=max(map(len, keys), default=6))
    for run in runs:
        overall.add_column(run_label(run), justify="right")
    for key in keys:
        overall.add_row(key, *(_fmt(m.get(key)) for m in chosen))
    overall.add_row("wall time", *(f"{run.wall_s:.0f} s" for run in runs))
    out.print(overall)
    out.print(f"demo finished in {wall_s:.0f} s; report: {report}")


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def run_demo(out: Path, quick: bool = False, data: Path | None = None, overrides: list[str] | None = None) -> Path:
    """Run the whole demo into ``out``; returns the path of the report."""
    from medsyngan.workflows.runner import train as run_training

    start = time.time()
    out = Path(out)
    if (out / REPORTED / "checkpoints").exists():
        raise UserError(f"{out} already holds a demo run; choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out / "demo.log")
    recipes = demo_recipes()
    settings = demo_settings(recipes, quick, data, overrides or [])
    base = demo_config(recipes, settings)
    train, test = evaluation_sets(base)
    log.info("demo data: %d training images of %d patients; %d test images of %d patients", len(train),
             len(np.unique(train.patients)), len(test), len(np.unique(test.patients)))

    runs: dict[str, RunOutcome] = {}
    for name, recipe in recipes.book.recipes.items():
        cfg = run_config(recipes, name, settings, base, runs)
        outcome = RunOutcome(name, recipe.label, RunDir(out / name).create(cfg), cfg)
        t0 = time.time()
        run_training(cfg, outcome.run_dir)
        outcome.wall_s = time.time() - t0
        runs[name] = outcome
    setup_logging(out / "demo.log")

    log.info("evaluating the %d runs against %d test images", len(runs), len(test))
    scored = {name: evaluate_run(run.run_dir.root, test, train) for name, run in runs.items()}
    for name, run in runs.items():
        run.metrics = dict(scored[name].metrics)
    reported = runs[REPORTED]
    references = [run for name, run in runs.items() if name != REPORTED]
    report = write_demo_report(out, reported, scored[REPORTED], references, train)
    hospitals = hospital_table(reported.run_dir)
    summary: dict[str, Any] = {
        name: {"wall_s": run.wall_s, "metrics": run.metrics}
        | ({} if run.cfg.federated.enabled else {"steps": run.cfg.train.steps}) for name, run in runs.items()
    }
    summary |= {"report": str(report), "hospitals": hospitals, "images_through_d": images_seen(reported.run_dir),
                "wall_s": time.time() - start, "quick": quick}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    print_summary([reported, *references], hospitals, time.time() - start, report)
    return report
