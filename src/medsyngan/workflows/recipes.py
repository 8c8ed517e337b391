"""Recipes: a run described as data, and the one place its length is derived from a budget.

A recipe names a preset, the settings that differ from it (``overrides``, TOML tables: ``[overrides.train]
lr_g = 3e-4``), the recipe whose trained model initialises it (``start_from``) and what each choice was made on
(``chosen_on``: setting names → the evidence). A recipe may build on another (``base``): the base's preset and
overrides come first, then its own. The study's rows live in ``experiments/nih-64/``, its tuning variants in
``experiments/nih-64/tuning.toml`` and the demo's runs in ``medsyngan/workflows/demo-recipes.toml``; all are read
here.

A recipe sets batch size, local steps and D steps per G step; how long a run is follows from the images through D
that a budget grants (:func:`fit_length`), so recipes compared at one budget see the same amount of data.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medsyngan.config import Config, load_config
from medsyngan.errors import UserError


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    label: str = Field("", description="How tables and reports name the run.")
    preset: str = Field("", description="The preset it starts from (inherited from `base` when empty).")
    base: str = Field("", description="A recipe whose preset and overrides come before this one's.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Settings that differ from the preset.")
    start_from: str = Field("", description="The recipe whose trained model initialises this one (train.init_from).")
    chosen_on: dict[str, str] = Field(
        default_factory=dict, description="Setting names (comma-separated) → what the choice was made on; "
        "'other settings' for the rest."
    )
    question: str = Field("", description="A tuning variant: the question it answered.")
    images_through_d: int = Field(0, ge=0, description="A budget of its own (0: the budget of the study or demo).")
    federated_length: Literal["rounds", "local_steps"] = Field(
        "rounds", description="What the budget sets in a federated run: the rounds, or (local_steps) each round's "
        "steps at the configured rounds, so that a round keeps the private D steps its plan counted."
    )
    images_from: str = Field("", description="Train for the images through D that this recipe's run measured.")
    seed_offset: int = Field(0, description="Added to run.seed and data.seed: other weights and other phantoms.")


OTHER_SETTINGS = "other settings"


def flatten(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """Nested override tables as ``section.key=value`` strings (values in TOML syntax), in file order."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += flatten(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={toml_value(value)}")
    return out


def toml_value(value: Any) -> str:
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def recipes_from_tables(tables: dict[str, Any], origin: str) -> dict[str, Recipe]:
    """Recipes from ``{name: table}``; a bad key or value is a one-line error naming the recipe."""
    recipes = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise UserError(f"{origin}: '{name}' is not a table of recipe settings")
        try:
            recipes[name] = Recipe(name=name, **table)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise UserError(f"{origin}: recipe '{name}', '{where}': {first['msg']}") from None
    return recipes


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such recipe file") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc}); fix the file's syntax") from None


def load_recipe(path: Path) -> Recipe:
    """One recipe per file, named by the file."""
    path = Path(path)
    return recipes_from_tables({path.stem: read_toml(path)}, str(path))[path.stem]


@dataclass(frozen=True)
class RecipeBook:
    """Recipes by name, resolved through their bases."""

    recipes: dict[str, Recipe]
    origin: str

    def __post_init__(self) -> None:
        for recipe in self.recipes.values():
            for ref in (recipe.base, recipe.start_from, recipe.images_from):
                if ref and ref not in self.recipes:
                    raise UserError(f"{self.origin}: recipe '{recipe.name}' refers to '{ref}', which is not a "
                                    f"recipe; known: {', '.join(self.recipes)}")
            if not self.preset(recipe.name):
                raise UserError(f"{self.origin}: recipe '{recipe.name}' names no preset and no base")
            self._check_chosen_on(recipe)

    def __getitem__(self, name: str) -> Recipe:
        if name not in self.recipes:
            close = difflib.get_close_matches(name, self.recipes, n=5)
            hint = f"did you mean {', '.join(close)}?" if close else f"the recipes are those of {self.origin}"
            raise UserError(f"{self.origin}: no recipe '{name}'; {hint}")
        return self.recipes[name]

    def chain(self, name: str) -> list[Recipe]:
        """The recipe's bases, outermost first, then the recipe."""
        chain, seen = [], set()
        while name:
            if name in seen:
                raise UserError(f"{self.origin}: recipe '{name}' is its own base")
            seen.add(name)
            chain.insert(0, self[name])
            name = chain[0].base
        return chain

    def preset(self, name: str) -> str:
        return next((r.preset for r in reversed(self.chain(name)) if r.preset), "")

    def start_from(self, name: str) -> str:
        return next((r.start_from for r in reversed(self.chain(name)) if r.start_from), "")

    def overrides(self, name: str) -> list[str]:
        return [item for recipe in self.chain(name) for item in flatten(recipe.overrides)]

    def images_through_d(self, name: str) -> int:
        return next((r.images_through_d for r in reversed(self.chain(name)) if r.images_through_d), 0)

    def _check_chosen_on(self, recipe: Recipe) -> None:
        known = {item.split("=", 1)[0] for item in self.overrides(recipe.name)}
        for key in recipe.chosen_on:
            unknown = [s.strip() for s in key.split(",") if s.strip() not in known] if key != OTHER_SETTINGS else []
            if unknown:
                raise UserError(f"{self.origin}: recipe '{recipe.name}': chosen_on names {', '.join(unknown)}, "
                                "which its overrides do not set")


def recipe_settings(book: RecipeBook, name: str, before: list[str] = (), after: list[str] = (),
                    start: Path | None = None) -> list[str]:
    """The overrides that make the recipe's configuration from its preset: ``before`` (settings of the whole study
    or demo), the recipe's overrides, ``train.init_from`` = ``start`` (the run of its ``start_from``), ``after``."""
    if book.start_from(name) and start is None:
        raise UserError(f"recipe '{name}' starts from '{book.start_from(name)}': its run folder is needed")
    init = [f"train.init_from={toml_value(str(start))}"] if start is not None else []
    return [*before, *book.overrides(name), *init, *after]


def recipe_config(book: RecipeBook, name: str, *, before: list[str] = (), after: list[str] = (),
                  start: Path | None = None) -> Config:
    """The recipe's configuration (:func:`recipe_settings` on its preset, then its seed offset); the length is
    the caller's: :func:`fit_length`."""
    cfg = load_config(book.preset(name), recipe_settings(book, name, before, after, start))
    offset = book[name].seed_offset
    if offset:
        cfg.run.seed += offset
        cfg.data.seed += offset
    return cfg


# ------------------------------------------------------------------------------------------------ length


def images_per_step(cfg: Config) -> int:
    """Real images through D per G step of the whole run (every hospital's, in a federated run)."""
    hospitals = cfg.federated.hospitals if cfg.federated.enabled else 1
    return hospitals * cfg.train.d_steps_per_g * cfg.train.batch_size


def planned_images(cfg: Config) -> int:
    """Real images through D that the configuration plans (Poisson sampling under DP varies around it)."""
    if cfg.federated.enabled:
        return cfg.federated.rounds * cfg.federated.local_steps * images_per_step(cfg)
    return cfg.train.steps * images_per_step(cfg)


@dataclass(frozen=True)
class Schedule:
    """How often a run writes what, relative to its length (None: as configured)."""

    sample_grids: int | None = None  # centralized: sample grids over the run
    log_rows: int | None = None  # centralized: metrics rows over the run
    evaluations: int | None = None  # federated: hospital-side evaluations over the run


def fit_length(cfg: Config, images: int, federated_length: str = "rounds", schedule: Schedule = Schedule()) -> Config:
    """A copy of ``cfg`` that pushes ``images`` real images through D: centralized, ``train.steps`` = images /
    (batch × D steps per G step), with one checkpoint at the end; federated, ``federated.rounds`` = images /
    (hospitals × local steps × D steps per G step × batch), or with ``federated_length="local_steps"`` the local
    steps of the configured rounds, rounded down (a round never takes more private steps than planned).
    Steps and rounds are rounded to the nearest whole number, at least one."""
    out = cfg.model_copy(deep=True)
    per_step = images_per_step(cfg)
    if not cfg.federated.enabled:
        steps = max(1, round(images / per_step))
        out.train.steps = out.train.checkpoint_every = steps
        if schedule.sample_grids:
            out.train.sample_every = max(1, steps // schedule.sample_grids)
        if schedule.log_rows:
            out.train.log_every = max(1, steps // schedule.log_rows)
        return out
    f = out.federated
    if federated_length == "local_steps":
        f.local_steps = max(1, images // (per_step * f.rounds))
    else:
        f.rounds = max(1, round(images / (per_step * f.local_steps)))
    if schedule.evaluations:
        f.eval_every = max(1, f.rounds // schedule.evaluations)
    return out
