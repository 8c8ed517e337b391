"""An experiment folder (``experiments/<name>/``): recipes trained at one budget on a prepared dataset, per seed.

``study.toml`` holds the protocol — the rows in order, the seeds and which settings a seed sets, the budget (and
a ``quick`` one for CI), the settings every row shares, the data split and the targets — and each row is a recipe
file beside it (``<row>.toml``). ``tuning.toml`` holds named variants of the rows (``[variants.<name>]``, each
with a ``base`` row). :class:`Workspace` turns a recipe and a seed into a configuration and a run folder, trains
what a run starts from first, and keeps a finished run whose resolved recipe is unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medsyngan.config import Config
from medsyngan.errors import UserError
from medsyngan.rundir import RunDir, atomic_write_text
from medsyngan.workflows.recipes import (Recipe, RecipeBook, Schedule, fit_length, flatten, load_recipe,
                                         planned_images, read_toml, recipe_config, recipe_settings,
                                         recipes_from_tables, toml_value)

TRAINED_FILE = "trained.json"
PUBLIC_SOURCES = ("phantoms", "covid-cxr", "phantoms+covid-cxr")  # data.source values that read no hospital's films


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Budget(_Strict):
    images_through_d: int = Field(ge=1, description="Real images through D of every row.")
    width: int = Field(ge=1, description="DCGAN width (model.ngf = model.ndf).")
    samples: int = Field(ge=2, description="Synthetic images scored per run (eval.num_samples).")
    ema_kimg: float = Field(ge=0, description="Generator EMA half-life (train.ema_kimg).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Applied after every recipe.")

    def before(self) -> list[str]:
        return [f"model.ngf={self.width}", f"model.ndf={self.width}", f"train.ema_kimg={self.ema_kimg!r}",
                f"eval.num_samples={self.samples}"]

    def after(self) -> list[str]:
        return flatten(self.overrides)

    def scaled(self, factor: int) -> "Budget":
        return self.model_copy(update={"images_through_d": self.images_through_d * factor})


class Split(_Strict):
    holdout_fraction: float = Field(gt=0, lt=1)
    seed: int


class TuningSplit(Split):
    """The validation patients of ``--tune`` (``holdout_fraction`` of the tuning patients, drawn with ``seed``)."""

    donated_fraction: float | None = Field(
        None, gt=0, lt=1,
        description="DP-safe selection: this fraction of the study's training patients (drawn with ``seed``) is a "
        "donated tuning set, treated as public — tuning trains and validates on it alone, and no row trains on "
        "it, so that a choice made on it costs the hospitals no ε. None: tuning splits the rows' own training "
        "patients (a look at private data that ε does not pay for).",
    )


class Target(_Strict):
    row: str
    reference: str
    fd_ratio: float | None = Field(None, description="Largest FD ratio row / reference (none: measured only).")


class MiaTarget(_Strict):
    rows: list[str]
    max_auc: float


class Sweep(_Strict):
    """A privacy sweep: rows that differ in ε only, plotted against it."""

    rows: list[str]
    epsilons: list[float] = Field(description="ε of each row, in order (inf: without DP).")
    figure: str = Field(description="File name of the plot in the docs' results folder.")


class Experiment(_Strict):
    name: str = Field("study", description="What files of this study in the docs' results folder are called.")
    films: Literal["nih", "covid-cxr"] = Field(
        "nih", description="The films split into training and evaluation patients: the 64-px NIH sample, or the "
        "public COVID-19 films (prepared at `size`).")
    size: int = Field(64, description="Side in pixels of the films the study trains and scores on.")
    rows: list[str]
    quick_rows: list[str]
    seeds: list[int]
    seed_settings: list[str] = Field(description="Settings a study seed sets (the weights' and the data's).")
    metrics: str
    tuning_metrics: str
    split: Split
    tuning_split: TuningSplit
    budget: Budget
    quick: Budget
    schedule: dict[str, int] = Field(default_factory=dict)
    every_row: dict[str, Any] = Field(default_factory=dict, description="Settings of every row, before its recipe.")
    targets: list[Target] = Field(default_factory=list)
    mia_target: MiaTarget | None = None
    utility: bool = Field(False, description="Also score utility, detectability and re-identification (the rows "
                          "must be conditional: evaluate_run(utility=True)).")
    sweep: Sweep | None = None


@dataclass(frozen=True)
class ExperimentFolder:
    folder: Path
    study: Experiment
    book: RecipeBook  # the rows and the tuning variants

    @property
    def variants(self) -> list[Recipe]:
        return [r for name, r in self.book.recipes.items() if name not in self.study.rows]

    @property
    def schedule(self) -> Schedule:
        return Schedule(**self.study.schedule)

    def dependencies(self) -> set[str]:
        """Recipes that others start from: trained once per seed and kept while their recipe holds."""
        return {self.book.start_from(name) for name in self.book.recipes} - {""}


def load_experiment(folder: Path) -> ExperimentFolder:
    folder = Path(folder)
    origin = folder / "study.toml"
    try:
        study = Experiment(**read_toml(origin))
    except (ValidationError, TypeError) as exc:
        detail = exc.errors()[0] if isinstance(exc, ValidationError) else {"loc": (), "msg": str(exc)}
        raise UserError(f"{origin}: '{'.'.join(map(str, detail['loc']))}': {detail['msg']}") from None
    if study.films == "nih" and study.size != 64:
        raise UserError(f"{origin}: size = {study.size}, but the NIH sample holds 64-px films; set size = 64")
    recipes = {name: load_recipe(folder / f"{name}.toml") for name in study.rows}
    tuning = folder / "tuning.toml"
    variants = recipes_from_tables(read_toml(tuning).get("variants", {}), str(tuning)) if tuning.is_file() else {}
    clash = sorted(set(recipes) & set(variants))
    if clash:
        raise UserError(f"{tuning}: variants {', '.join(clash)} have the name of a row; rename them")
    swept = study.sweep.rows if study.sweep else []
    unknown = sorted({*study.quick_rows, *(t.row for t in study.targets), *(t.reference for t in study.targets),
                      *swept} - set(recipes))
    if unknown:
        raise UserError(f"{origin}: {', '.join(unknown)} not among the rows")
    if study.sweep and len(study.sweep.epsilons) != len(swept):
        raise UserError(f"{origin}: sweep.epsilons has {len(study.sweep.epsilons)} values for {len(swept)} rows; "
                        "give one ε per row")
    return ExperimentFolder(folder, study, RecipeBook(recipes | variants, str(folder)))


@dataclass(frozen=True)
class PlannedRun:
    name: str
    seed: int
    cfg: Config
    folder: Path
    plan: dict[str, Any]  # what was asked of the run: reused only when it is unchanged

    def planned_as(self, saved: Any) -> bool:
        """Whether a plan saved beside a finished run is this run's, wherever its work folder was: a run copied
        from another work folder of the same study (same data, same starts) is the same run."""
        return isinstance(saved, dict) and _portable(saved) == _portable(self.plan)

    @property
    def public_data(self) -> bool:
        """Trained on public data only (phantoms, the COVID-19 films, or both): the same run serves every data split
        of the work folder."""
        return self.cfg.data.source in PUBLIC_SOURCES


_WORK_PATH = re.compile(r'="[^"]*/(data|runs|tuning)/([^"/]*)"$')


def _portable(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan with every path of its work folder (its data, the runs it starts from) written relative to it."""
    settings = [_WORK_PATH.sub(r'="<work>/\1/\2"', item) for item in plan.get("settings", [])]
    return {**plan, "settings": settings}


class Workspace:
    """Runs of an experiment's recipes in a work folder: ``runs/<name>-s<seed>`` (``tuning/`` for runs on the
    tuning split; a run on public data alone is shared by both, in ``runs/``). A recipe's relative
    ``train.label_table`` names a folder of the work folder (``data/donated``: the donated tuning set)."""

    def __init__(self, exp: ExperimentFolder, out: Path, data: Path, budget: Budget, runs: str = "runs"):
        self.exp, self.out, self.data, self.budget, self.runs = exp, Path(out), Path(data), budget, runs

    def before(self, name: str, seed: int) -> list[str]:
        seeds = [f"{key}={seed}" for key in self.exp.study.seed_settings]
        return [*flatten(self.exp.study.every_row), f"data.path={toml_value(str(self.data))}", *self.budget.before(),
                *seeds, f"run.name={toml_value(f'study-{name}-s{seed}')}"]

    def plan(self, name: str, seed: int) -> PlannedRun:
        book = self.exp.book
        start = self.plan(book.start_from(name), seed).folder if book.start_from(name) else None
        before, after = self.before(name, seed), self.budget.after()
        images = book.images_through_d(name) or self.budget.images_through_d
        cfg = fit_length(recipe_config(book, name, before=before, after=after, start=start), images,
                         book[name].federated_length, self.exp.schedule)
        table = cfg.train.label_table
        if table and not Path(table).is_absolute():  # a folder of the work folder, e.g. the donated tuning set
            after = [*after, f"train.label_table={toml_value(str(self.out / table))}"]
            cfg = fit_length(recipe_config(book, name, before=before, after=after, start=start), images,
                             book[name].federated_length, self.exp.schedule)
        if planned_images(cfg) != images:
            raise UserError(f"recipe '{name}': its batch, local steps and D steps do not divide the budget of "
                            f"{images} images through D ({planned_images(cfg)} planned); change them or the budget")
        public = cfg.data.source in PUBLIC_SOURCES
        if public:  # the recipe replaced the work folder's data: its run serves the study and the tuning alike
            before = [item for item in before if not item.startswith("data.path=")]
        plan = {"preset": book.preset(name), "settings": recipe_settings(book, name, before, after, start),
                "images_through_d": images, "schedule": self.exp.study.schedule}
        runs = "runs" if public else self.runs
        return PlannedRun(name, seed, cfg, self.out / runs / f"{name}-s{seed}", plan)

    def trained(self, run: PlannedRun) -> float | None:
        """The training seconds of a finished run of this very plan in its folder, else None."""
        marker = run.folder / TRAINED_FILE
        if marker.is_file():
            saved = json.loads(marker.read_text())
            if run.planned_as(saved.get("plan")):
                return float(saved["wall_s"])
        return None

    def ensure(self, run: PlannedRun, retrain: bool = False) -> float:
        """Train ``run`` (after what it starts from) unless it is finished with this plan; training seconds."""
        from medsyngan.workflows.runner import train

        start = self.exp.book.start_from(run.name)
        if start:
            self.ensure(self.plan(start, run.seed))
        wall = None if retrain else self.trained(run)
        if wall is not None:
            return wall
        print(f"[study] {run.name}, seed {run.seed}: {planned_images(run.cfg)} images through D", flush=True)
        shutil.rmtree(run.folder, ignore_errors=True)
        run_dir = RunDir(run.folder).create(run.cfg)
        t0 = time.time()
        train(run.cfg, run_dir)
        wall = round(time.time() - t0, 1)
        atomic_write_text(run.folder / TRAINED_FILE, json.dumps({"plan": run.plan, "wall_s": wall}) + "\n")
        return wall
