"""Recipes as data: the loader and its one-line errors, bases, what a recipe resolves to, and the one place a run's
length follows from a budget of images through D."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsyngan.config import load_config
from medsyngan.errors import UserError
from medsyngan.workflows.recipes import (RecipeBook, Schedule, fit_length, flatten, load_recipe, planned_images,
                                         recipe_config, recipes_from_tables)


def _book(tables: dict) -> RecipeBook:
    return RecipeBook(recipes_from_tables(tables, "test.toml"), "test.toml")


def test_overrides_flatten_to_settings_in_toml_syntax():
    tree = {"train": {"lr_g": 3e-4, "loss": "hinge"}, "privacy": {"dp": False}, "data": {"path": "/a b"}}
    assert flatten(tree) == ['train.lr_g=0.0003', 'train.loss="hinge"', "privacy.dp=false", 'data.path="/a b"']
    cfg = load_config("dcgan64", flatten(tree))
    assert (cfg.train.lr_g, cfg.train.loss, cfg.data.path) == (3e-4, "hinge", "/a b")


def test_a_recipe_builds_on_its_base_and_starts_from_a_run(tmp_path):
    book = _book({
        "public": {"preset": "dcgan64", "overrides": {"data": {"source": "phantoms"}, "train": {"beta1": 0.0}}},
        "warm": {"base": "public", "start_from": "public", "overrides": {"train": {"lr_g": 1e-4}},
                 "chosen_on": {"train.lr_g": "validation, seed 0", "other settings": "not tuned"}},
        "other": {"base": "warm", "seed_offset": 10, "overrides": {"train": {"beta1": 0.5}}},
    })
    assert [r.name for r in book.chain("other")] == ["public", "warm", "other"]
    assert book.preset("other") == "dcgan64" and book.start_from("other") == "public"
    assert book.overrides("other") == ['data.source="phantoms"', "train.beta1=0.0", "train.lr_g=0.0001",
                                       "train.beta1=0.5"]
    cfg = recipe_config(book, "other", before=["run.seed=2", "train.lr_g=9e-4"], after=["train.steps=7"],
                        start=tmp_path)
    assert (cfg.train.beta1, cfg.train.lr_g, cfg.train.steps) == (0.5, 1e-4, 7)  # the recipe wins over `before`
    assert cfg.train.init_from == str(tmp_path) and (cfg.run.seed, cfg.data.seed) == (12, 10)
    with pytest.raises(UserError, match="starts from 'public': its run folder is needed"):
        recipe_config(book, "warm")


@pytest.mark.parametrize("tables, message", [
    ({"a": {"preset": "dcgan64", "overides": {}}}, "recipe 'a', 'overides': Extra inputs are not permitted"),
    ({"a": {"overrides": {}}}, "recipe 'a' names no preset and no base"),
    ({"a": {"preset": "dcgan64", "start_from": "nope"}}, "recipe 'a' refers to 'nope', which is not a recipe"),
    ({"a": {"base": "b"}, "b": {"base": "a"}}, "is its own base"),
    ({"a": {"preset": "dcgan64", "overrides": {"train": {"lr_g": 1e-4}}, "chosen_on": {"train.lr_d": "x"}}},
     "chosen_on names train.lr_d, which its overrides do not set"),
    ({"a": {"preset": "dcgan64", "federated_length": "steps"}}, "recipe 'a', 'federated_length'"),
])
def test_a_bad_recipe_is_a_one_line_error_naming_it(tables, message):
    with pytest.raises(UserError, match=message) as err:
        _book(tables)
    assert "\n" not in str(err.value)


def test_a_recipe_file_is_named_by_the_file_and_bad_toml_is_one_line(tmp_path):
    path = tmp_path / "row.toml"
    path.write_text('label = "a row"\npreset = "dcgan64"\n[overrides.train]\nlr_g = 3e-4\n')
    recipe = load_recipe(path)
    assert (recipe.name, recipe.label, recipe.overrides) == ("row", "a row", {"train": {"lr_g": 3e-4}})
    path.write_text("label = \n")
    with pytest.raises(UserError, match=r"row.toml: not valid TOML"):
        load_recipe(path)
    with pytest.raises(UserError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.toml")


def test_an_unknown_name_suggests_the_close_ones():
    book = _book({"public-hinge": {"preset": "dcgan64"}, "public-ema": {"preset": "dcgan64"}})
    with pytest.raises(UserError, match="no recipe 'public-hinj'; did you mean public-hinge"):
        book["public-hinj"]


def test_a_centralized_run_gets_steps_and_a_federated_one_rounds_from_the_images():
    central = load_config("dcgan64", ["train.batch_size=16", "train.d_steps_per_g=2"])
    fitted = fit_length(central, 19200, schedule=Schedule(sample_grids=4, log_rows=20))
    assert (fitted.train.steps, fitted.train.checkpoint_every) == (600, 600)
    assert (fitted.train.sample_every, fitted.train.log_every) == (150, 30)
    assert planned_images(fitted) == 19200 and central.train.steps == 2000  # a copy: the input is left alone

    fed = load_config("federated-dcgan64", ["train.batch_size=32", "federated.local_steps=5",
                                            "train.d_steps_per_g=5", "federated.hospitals=3"])
    fitted = fit_length(fed, 19200, schedule=Schedule(evaluations=1))
    assert (fitted.federated.rounds, fitted.federated.eval_every) == (8, 8) and planned_images(fitted) == 19200
    assert fit_length(fed, 4 * 19200).federated.rounds == 32  # a larger budget: more rounds of the same steps


def test_local_steps_keep_the_rounds_and_never_exceed_the_planned_images():
    fed = load_config("federated-dcgan64", ["train.batch_size=8", "federated.rounds=3", "federated.local_steps=5",
                                            "federated.hospitals=3"])
    grouped = fed.model_copy(deep=True)
    grouped.train.d_steps_per_g = 5
    fitted = fit_length(grouped, planned_images(fed), "local_steps")
    assert (fitted.federated.rounds, fitted.federated.local_steps) == (3, 1)
    assert planned_images(fitted) == planned_images(fed)
    grouped.train.d_steps_per_g = 3  # 5 D steps a round do not make whole groups of 3: rounded down
    fitted = fit_length(grouped, planned_images(fed), "local_steps")
    assert fitted.federated.local_steps == 1 and planned_images(fitted) == 216 < planned_images(fed) == 360
    grouped.train.d_steps_per_g = 9  # at least one step
    assert fit_length(grouped, planned_images(fed), "local_steps").federated.local_steps == 1


def test_the_demo_and_study_recipes_load():
    from medsyngan.workflows.demo import demo_recipes
    from medsyngan.workflows.experiment import load_experiment

    demo = demo_recipes()
    assert list(demo.book.recipes) == ["public", "federated", "centralized"]
    assert demo.book.start_from("centralized") == "public" and demo.book["centralized"].images_from == "federated"
    exp = load_experiment(Path(__file__).resolve().parents[1] / "experiments" / "nih-64")
    assert exp.study.rows[0] == "public" and exp.dependencies() >= {"public", "public-adam-0.5"}
    assert all(exp.book[row].label and exp.book[row].chosen_on for row in exp.study.rows)
