"""data.seed draws the data (phantoms, on-the-fly hospital partition, held-out patients); run.seed does not."""

from __future__ import annotations

import numpy as np

from medsyngan.config import load_config
from medsyngan.data.api import load_training_data
from medsyngan.federated.client import NodeIdentity, load_hospital_data
from medsyngan.rundir import RunDir
from medsyngan.workflows.federation import PARTITION_FILE, prepare_job

SMALL = ["data.phantom_patients=24", "data.phantom_images_per_patient=2", "data.size=32", "model.resolution=32",
         "federated.enabled=true", "federated.hospitals=3", 'federated.scheme="label-skew"',
         "federated.holdout_fraction=0.3", "hospital.dp_required=false", "hospital.encrypt_required=false",
         "hospital.secagg_required=false"]  # a data test: the hospitals accept a non-private federation


def _data(tmp_path, name: str, *seeds: str):
    """(images, partition CSV, each hospital's held-out patients) of a configuration."""
    cfg = load_config(None, SMALL + list(seeds))
    job = prepare_job(cfg, RunDir(tmp_path / name).create(cfg), resume=False, simulation=True)
    held = []
    for hospital in range(3):
        identity = NodeIdentity(hospital, None, tmp_path / name / "state")
        held.append(sorted(set(load_hospital_data(identity, job, cfg)[1].patients.tolist())))
    return np.asarray(load_training_data(cfg).images), (tmp_path / name / PARTITION_FILE).read_text(), held


def test_the_run_seed_varies_on_fixed_data_and_the_data_seed_changes_it(tmp_path, medsyngan_cache):
    images, partition, held = _data(tmp_path, "a", "run.seed=1", "data.seed=5")
    same_images, same_partition, same_held = _data(tmp_path, "b", "run.seed=2", "data.seed=5")
    np.testing.assert_array_equal(images, same_images)
    assert partition == same_partition and held == same_held and any(held)
    other_images, other_partition, other_held = _data(tmp_path, "c", "run.seed=1", "data.seed=6")
    assert not np.array_equal(images, other_images)
    assert partition != other_partition and held != other_held


def test_the_demo_public_model_draws_other_phantoms_than_the_hospitals():
    from medsyngan.workflows.demo import demo_config, demo_recipes, run_config

    recipes = demo_recipes()
    cfg = demo_config(recipes, [])
    public = run_config(recipes, "public", [], cfg, {})
    assert cfg.data.seed == 7 and public.data.seed != cfg.data.seed and public.run.seed != cfg.run.seed
