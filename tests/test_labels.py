"""Labels in the data: the conditioning vector's layout and encoding, a user's request, the label distributions
generated images draw from, and sex and age from every reader into the prepared index."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from medsyngan.config import load_config
from medsyngan.data.labels import (AGE_BANDS, FINDINGS, JointLabels, LabelLayout, MarginalLabels, age_band,
                                   distribution_from_json, grid_labels, public_labels, training_labels)
from medsyngan.data.prepared import INDEX_FILE, PreparedDataset, normalize_sex, parse_age
from medsyngan.errors import UserError

ALL = LabelLayout.of(["age", "sex", "view", "findings"])


def test_the_layout_keeps_its_fixed_order_whatever_the_configuration_lists():
    assert ALL.groups == ("findings", "view", "sex", "age")
    assert ALL.dim == 14 + 2 + 2 + 4 and len(ALL.names()) == ALL.dim
    assert ALL.names()[:2] == ["findings:Atelectasis", "findings:Cardiomegaly"] and ALL.names()[-1] == "age:60+"
    assert LabelLayout.of(["sex", "view"]) == LabelLayout.of(["view", "sex"])
    assert LabelLayout.of([]).dim == 0
    with pytest.raises(UserError, match="unknown groups"):
        LabelLayout.of(["race"])


def test_encoding_and_decoding_of_one_image():
    vec = ALL.encode(["Effusion", "Nodule", "COVID-19"], "pa", "F", 45)
    assert vec.sum() == 5  # two findings (COVID-19 has no component), view, sex, age band
    assert ALL.decode(vec) == {"findings": ("Effusion", "Nodule"), "view": "PA", "sex": "F", "age": "40-59"}
    assert ALL.describe(vec) == "Effusion|Nodule, PA, F, 40-59"
    unknown = ALL.encode([], "", "", -1)
    assert unknown.sum() == 0 and ALL.describe(unknown) == "No Finding, view unknown, sex unknown, age unknown"
    rows = ALL.encode_records([("Mass",), ()], ["AP", "PA"], ["M", ""], [17, 60])
    assert [ALL.describe(r) for r in rows] == ["Mass, AP, M, 0-17", "No Finding, PA, sex unknown, 60+"]


@pytest.mark.parametrize("text, years", [("57", 57), ("057Y", 57), ("010M", 0), ("003D", 0), ("", -1), ("abc", -1),
                                         ("412", -1)])
def test_ages_as_nih_and_other_metadata_write_them(text, years):
    assert parse_age(text) == years


def test_age_bands_and_sexes():
    assert [age_band(a) for a in (0, 17, 18, 39, 40, 59, 60, 99, -1)] == \
        ["0-17", "0-17", "18-39", "18-39", "40-59", "40-59", "60+", "60+", ""]
    assert [normalize_sex(s) for s in ("M", "f", "Female", "male", "O", "")] == ["M", "F", "F", "M", "", ""]


def test_a_request_fixes_the_named_groups_with_one_line_errors():
    fixed = ALL.request(["effusion", "Pleural Thickening"], "ap", "female", "45")
    assert set(fixed) == {"findings", "view", "sex", "age"}
    assert [FINDINGS[i] for i in np.flatnonzero(fixed["findings"])] == ["Effusion", "Pleural_Thickening"]
    assert fixed["view"].tolist() == [0, 1] and fixed["sex"].tolist() == [1, 0]
    assert AGE_BANDS[int(np.argmax(fixed["age"]))] == "40-59"
    assert ALL.request(["No Finding"])["findings"].sum() == 0 and ALL.request() == {}
    with pytest.raises(UserError, match="'Efusion' is not a known finding; use one of No Finding, Atelectasis"):
        ALL.request(["Efusion"])
    with pytest.raises(UserError, match="--view 'LAT' is not known; use one of PA, AP"):
        ALL.request(view="LAT")
    with pytest.raises(UserError, match="not a band"):
        ALL.request(age="old")
    with pytest.raises(UserError, match="--sex: this model is not conditioned on sex"):
        LabelLayout.of(["view"]).request(sex="F")
    with pytest.raises(UserError, match="this model is unconditional"):
        LabelLayout.of([]).request(view="PA")


def test_the_joint_distribution_draws_as_often_as_the_table_has_each_row():
    layout = LabelLayout.of(["view", "sex"])
    labels = layout.encode_records([()] * 100, ["PA"] * 80 + ["AP"] * 20, ["M"] * 70 + ["F"] * 10 + ["F"] * 20,
                                   [-1] * 100)
    dist = JointLabels.count(layout, labels)
    assert len(dist.rows) == 3 and sorted(dist.weights.tolist()) == [10, 20, 70]
    draws = dist.sample(20000, torch.Generator().manual_seed(0))
    assert draws[:, 1].mean().item() == pytest.approx(0.2, abs=0.01)  # AP
    # Fixing the view draws sex from the films of that view: every AP film here is F.
    ap = dist.sample(500, torch.Generator().manual_seed(1), layout.request(view="AP"))
    assert torch.all(ap[:, 1] == 1) and torch.all(ap[:, 2] == 1)
    pa = dist.sample(4000, torch.Generator().manual_seed(2), layout.request(view="PA"))
    assert pa[:, 2].mean().item() == pytest.approx(10 / 80, abs=0.02)
    back = distribution_from_json(dist.to_json())
    assert torch.equal(back.sample(50, torch.Generator().manual_seed(3)), dist.sample(50, torch.Generator().manual_seed(3)))


def test_the_marginal_distribution_draws_each_group_on_its_own():
    layout = LabelLayout.of(["findings", "view"])
    probs = np.zeros(layout.dim)
    probs[FINDINGS.index("Effusion")] = 0.3
    probs[14:16] = [0.5, 0.25]  # a quarter of the views unknown
    dist = MarginalLabels(layout, probs)
    draws = dist.sample(20000, torch.Generator().manual_seed(0))
    assert draws[:, :14].sum(0).argmax().item() == FINDINGS.index("Effusion")
    assert draws[:, FINDINGS.index("Effusion")].mean().item() == pytest.approx(0.3, abs=0.015)
    assert draws[:, 14:16].mean(0).tolist() == pytest.approx([0.5, 0.25], abs=0.015)
    assert draws[:, 14:16].sum(1).max().item() == 1  # one view at most
    fixed = dist.sample(10, torch.Generator().manual_seed(0), layout.request(view="AP"))
    assert torch.all(fixed[:, 15] == 1) and torch.all(fixed[:, 14] == 0)
    assert isinstance(distribution_from_json(dist.to_json()), MarginalLabels)


def test_grid_labels_step_through_every_value():
    rows = grid_labels(ALL, 16)
    decoded = [ALL.decode(r) for r in rows]
    assert {d["view"] for d in decoded} == {"PA", "AP"} and {d["sex"] for d in decoded} == {"F", "M"}
    assert {d["age"] for d in decoded} == set(AGE_BANDS)
    assert sum(bool(d["findings"]) for d in decoded) == 8


def _data_entry(path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                         "View Position"])
        writer.writerows(rows)


def test_public_frequencies_count_every_row_of_a_data_entry_table(tmp_path):
    table = tmp_path / "Data_Entry_2017_v2020.csv"
    _data_entry(table, [["a.png", "Effusion", 0, 1, 57, "M", "PA"], ["b.png", "No Finding", 0, 2, "033Y", "F", "AP"],
                        ["c.png", "Effusion", 0, 3, 58, "M", "PA"]])
    dist = public_labels(ALL, table)
    assert sorted(dist.weights.tolist()) == [1, 2]
    assert {ALL.describe(r) for r in dist.rows} == {"Effusion, PA, M, 40-59", "No Finding, AP, F, 18-39"}
    with pytest.raises(UserError, match="train.label_table = .*: not found"):
        public_labels(ALL, tmp_path / "missing.csv")


def test_a_prepared_dataset_of_public_films_serves_as_the_label_table(tmp_path):
    from medsyngan.data.prepared import index_csv_text

    folder = tmp_path / "donated"
    folder.mkdir()
    (folder / INDEX_FILE).write_text(index_csv_text(["a.png", "b.png", "c.png"], ["1", "2", "2"],
                                                    [("Effusion",), (), ()], ["PA", "AP", "AP"], ["", "", ""],
                                                    ["M", "F", "F"], [57, 33, 34]))
    (folder / "images.u8").write_bytes(bytes(3 * 4 * 4))
    (folder / "manifest.json").write_text('{"format": 1, "count": 3, "size": 4}')
    dist = public_labels(ALL, folder)
    assert sorted(dist.weights.tolist()) == [1, 2]
    assert {ALL.describe(r) for r in dist.rows} == {"Effusion, PA, M, 40-59", "No Finding, AP, F, 18-39"}
    with pytest.raises(UserError, match="not found; point it at"):
        public_labels(ALL, tmp_path)  # a folder that is not a prepared dataset


def test_under_dp_the_training_data_is_refused_as_its_own_public_label_table(tmp_path):
    from medsyngan.data.labels import plain_label_source

    overrides = ["model.condition=['view']", 'train.label_source="public"', f"data.path={str(tmp_path)!r}",
                 f"train.label_table={str(tmp_path)!r}"]
    with pytest.raises(UserError, match="is the training data itself"):
        plain_label_source(load_config("dcgan64", overrides + ["privacy.dp=true"]), None)


def test_sex_and_age_travel_from_the_nih_metadata_to_the_prepared_index(tmp_path):
    from medsyngan.data.phantoms import write_phantoms
    from medsyngan.data.prepare import PrepareSettings, prepare

    records = write_phantoms(tmp_path / "raw", 4, 2, 16, seed=1)
    ds = prepare(tmp_path / "raw", tmp_path / "prepared", PrepareSettings(size=16)).dataset
    by_name = {r.name: r for r in records}
    assert [s for s in ds.sexes] == [by_name[n].gender for n in ds.image_names]
    assert [int(a) for a in ds.ages] == [by_name[n].age for n in ds.image_names]
    sub = ds.subset([3, 1])
    assert sub.sexes.tolist() == [ds.sexes[3], ds.sexes[1]] and sub.ages.tolist() == [ds.ages[3], ds.ages[1]]
    header = (tmp_path / "prepared" / INDEX_FILE).read_text().splitlines()[0]
    assert header == "image,patient,labels,view,split,sex,age"


def test_an_index_without_sex_and_age_still_opens_with_them_unknown(tmp_path):
    from medsyngan.data.phantoms import write_phantoms
    from medsyngan.data.prepare import PrepareSettings, prepare

    write_phantoms(tmp_path / "raw", 2, 2, 16, seed=1)
    prepare(tmp_path / "raw", tmp_path / "prepared", PrepareSettings(size=16))
    index = tmp_path / "prepared" / INDEX_FILE
    rows = list(csv.reader(index.open()))
    with open(index, "w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows([r[:5] for r in rows])
    ds = PreparedDataset.open(tmp_path / "prepared")
    assert ds.sexes.tolist() == [""] * 4 and ds.ages.tolist() == [-1] * 4
    cfg = load_config(None, ["model.condition=['view', 'sex']"])
    with pytest.raises(UserError, match="model.condition includes 'sex' but no image of the training set has one"):
        training_labels(cfg, ds)
    assert training_labels(load_config(None, ["model.condition=['view']"]), ds).shape == (4, 2)


def test_a_folder_labels_csv_may_give_sex_and_age(tmp_path):
    from PIL import Image

    from medsyngan.data.folder import read_folder

    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    (tmp_path / "labels.csv").write_text("image,patient,labels,view,sex,age\na.png,p1,COVID-19,AP,f,71\n"
                                         "b.png,p2,,PA,,\n")
    cat = read_folder(tmp_path, tmp_path / "labels.csv")
    assert cat.sexes.tolist() == ["F", ""] and cat.ages.tolist() == [71, -1]
