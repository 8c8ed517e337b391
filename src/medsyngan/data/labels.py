"""The conditioning vector: which labels a conditional GAN is given, how they become numbers, and where the labels
of generated images come from.

Layout
------
``model.condition`` names the groups a model is conditioned on, any of :data:`GROUPS`; the vector is the
concatenation of the named groups in this fixed order, whatever order the configuration lists them in:

============  ======================================================================  ==========================
group         components                                                              encoding
============  ======================================================================  ==========================
``findings``  the 14 NIH findings (:data:`FINDINGS`, alphabetical)                    multi-hot; none = No Finding
``view``      PA, AP                                                                  one-hot
``sex``       F, M                                                                    one-hot
``age``       age bands 0-17, 18-39, 40-59, 60+ (years, :data:`AGE_BANDS`)            one-hot
============  ======================================================================  ==========================

A value the data does not know (a film without a view position, a folder dataset without a ``sex`` column) is the
zero vector of its one-hot group. Labels outside the 14 NIH findings (e.g. ``COVID-19``) have no component and are
left out of the vector. An empty ``model.condition`` is an unconditional model (``dim == 0``).

Label frequencies
-----------------
Generated batches need labels too: they are drawn from a :class:`LabelDistribution`, either the empirical joint
distribution of label vectors of a table (:class:`JointLabels`: the public NIH metadata, or the training data's
own labels when the run is not private) or independent per-group marginals (:class:`MarginalLabels`: what the
differentially private release of the training data's label counts gives, ``privacy.label_release``). Both
draw from a ``torch.Generator`` and can fix some groups (``medsyngan generate --view AP``) while drawing the
others given them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsyngan.config import Config
from medsyngan.data.prepared import INDEX_FILE, NO_FINDING, UNKNOWN_AGE, PreparedDataset, normalize_sex
from medsyngan.errors import UserError

FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
            "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax")
VIEWS = ("PA", "AP")
SEXES = ("F", "M")
AGE_BANDS = ("0-17", "18-39", "40-59", "60+")
AGE_LOWER = (0, 18, 40, 60)  # first year of each band
GROUPS: dict[str, tuple[str, ...]] = {"findings": FINDINGS, "view": VIEWS, "sex": SEXES, "age": AGE_BANDS}


# ---------------------------------------------------------------------- single values
def age_band(age: int) -> str:
    """The band of an age in years ('' when unknown)."""
    if age < 0:
        return ""
    return AGE_BANDS[sum(age >= lower for lower in AGE_LOWER) - 1]


def parse_age_band(text: str) -> str:
    """A band as a user writes it: '40-59', '40–59', '60+', or an age in years ('45' → '40-59')."""
    value = text.strip().replace("–", "-").replace(" ", "")
    if value in AGE_BANDS:
        return value
    if value.isdigit():
        return age_band(int(value))
    raise UserError(f"age '{text}' is not a band; use one of {', '.join(AGE_BANDS)} or an age in years")


# ---------------------------------------------------------------------- the layout
@dataclass(frozen=True)
class LabelLayout:
    """The conditioning vector of ``groups`` (a subset of :data:`GROUPS`, kept in their fixed order)."""

    groups: tuple[str, ...]

    @classmethod
    def of(cls, condition: Sequence[str]) -> "LabelLayout":
        unknown = [g for g in condition if g not in GROUPS]
        if unknown:
            raise UserError(f"model.condition names unknown groups {unknown}; choose from {', '.join(GROUPS)}")
        if len(set(condition)) != len(condition):
            raise UserError(f"model.condition lists a group twice ({list(condition)}); name each once")
        return cls(tuple(g for g in GROUPS if g in condition))

    @property
    def dim(self) -> int:
        return sum(len(GROUPS[g]) for g in self.groups)

    @functools.cached_property
    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for group in self.groups:
            out[group] = slice(start, start + len(GROUPS[group]))
            start += len(GROUPS[group])
        return out

    @property
    def one_hot_groups(self) -> tuple[str, ...]:
        return tuple(g for g in self.groups if g != "findings")

    def names(self) -> list[str]:
        """Component names, ``group:value``, in vector order."""
        return [f"{g}:{v}" for g in self.groups for v in GROUPS[g]]

    def encode(self, findings: Sequence[str] = (), view: str = "", sex: str = "", age: int = UNKNOWN_AGE) -> np.ndarray:
        """One float32 vector for one image: its findings, view, sex ('M'/'F'/'') and age in years (-1: unknown);
        findings outside :data:`FINDINGS` are left out."""
        return self.encode_records([findings], [view], [sex], [age])[0]

    def encode_records(self, labels: Sequence[Sequence[str]], views: Sequence[str], sexes: Sequence[str],
                       ages: Sequence[int]) -> np.ndarray:
        """(N, dim) float32 for per-image findings, views, sexes ('M'/'F'/'') and ages in years (-1 unknown)."""
        out = np.zeros((len(labels), self.dim), np.float32)
        ages = np.asarray(ages, np.int64)
        values = {"view": np.char.upper(np.char.strip(np.asarray(views, dtype=str))),
                  "sex": np.asarray(sexes, dtype=str),
                  "age": np.where(ages < 0, "", np.asarray(AGE_BANDS)[np.searchsorted(AGE_LOWER, ages, "right") - 1])}
        for group, sl in self.slices.items():
            if group == "findings":
                index = {name: sl.start + i for i, name in enumerate(FINDINGS)}
                for row, findings in enumerate(labels):
                    out[row, [index[f] for f in findings if f in index]] = 1.0
                continue
            for i, member in enumerate(GROUPS[group]):
                out[values[group] == member, sl.start + i] = 1.0
        return out

    def decode(self, vec: np.ndarray | torch.Tensor) -> dict[str, Any]:
        """{'findings': (names...), 'view': 'PA' | '', ...} of one vector (components above 0.5 are set)."""
        v = np.asarray(vec.detach().cpu() if isinstance(vec, torch.Tensor) else vec, dtype=np.float32)
        out: dict[str, Any] = {}
        for group, sl in self.slices.items():
            on = [name for name, x in zip(GROUPS[group], v[sl]) if x > 0.5]
            out[group] = tuple(on) if group == "findings" else (on[0] if on else "")
        return out

    def describe(self, vec: np.ndarray | torch.Tensor) -> str:
        """'Effusion, PA, F, 40-59' — for file names, captions and DICOM descriptions."""
        parts = []
        for group, value in self.decode(vec).items():
            if group == "findings":
                parts.append("|".join(value) if value else NO_FINDING)
            else:
                parts.append(value or f"{group} unknown")
        return ", ".join(parts)

    def request(self, findings: Sequence[str] | None = None, view: str | None = None, sex: str | None = None,
                age: str | None = None) -> dict[str, np.ndarray]:
        """The groups a user fixed (None: not fixed), each as its part of the vector; one-line errors for unknown
        values and for groups this layout does not condition on."""
        given = {"findings": findings, "view": view, "sex": sex, "age": age}
        options = {"findings": "--label", "view": "--view", "sex": "--sex", "age": "--age"}
        if not self.groups and any(v is not None for v in given.values()):
            raise UserError("this model is unconditional (model.condition = []); drop --label/--view/--sex/--age")
        fixed: dict[str, np.ndarray] = {}
        for group, value in given.items():
            if value is None:
                continue
            if group not in self.groups:
                raise UserError(f"{options[group]}: this model is not conditioned on {group} (it is on "
                                f"{', '.join(self.groups)})")
            fixed[group] = self._part(group, value)
        return fixed

    def _part(self, group: str, value: Any) -> np.ndarray:
        members = GROUPS[group]
        part = np.zeros(len(members), np.float32)
        if group == "findings":
            names = [v.strip() for item in value for v in str(item).split("|") if v.strip()]
            by_lower = {m.lower(): i for i, m in enumerate(members)} | {m.lower().replace("_", " "): i
                                                                         for i, m in enumerate(members)}
            for name in names:
                if name.lower() == NO_FINDING.lower():
                    continue
                if name.lower() not in by_lower:
                    raise UserError(f"--label '{name}' is not a known finding; use one of {NO_FINDING}, "
                                    f"{', '.join(members)}")
                part[by_lower[name.lower()]] = 1.0
            return part
        text = parse_age_band(value) if group == "age" else (normalize_sex(value) if group == "sex"
                                                             else value.strip().upper())
        if text not in members:
            raise UserError(f"--{group} '{value}' is not known; use one of {', '.join(members)}")
        part[members.index(text)] = 1.0
        return part


def grid_labels(layout: LabelLayout, count: int) -> torch.Tensor:
    """A fixed, public design of labels for sample grids: consecutive images step through every value of each
    one-hot group (like the digits of a mixed-radix counter) and every other image carries one finding in turn."""
    rows = np.zeros((count, layout.dim), np.float32)
    for i in range(count):
        period = 1
        for group in layout.one_hot_groups:
            size = len(GROUPS[group])
            rows[i, layout.slices[group].start + (i // period) % size] = 1.0
            period *= size
        if "findings" in layout.groups and i % 2:
            rows[i, layout.slices["findings"].start + (i // 2) % len(FINDINGS)] = 1.0
    return torch.from_numpy(rows)


# ---------------------------------------------------------------------- label distributions
class LabelDistribution:
    """Where generated images' labels come from: ``sample(n, generator, fixed)`` → (n, dim) float32."""

    kind = ""

    def __init__(self, layout: LabelLayout):
        self.layout = layout

    def sample(self, n: int, generator: torch.Generator, fixed: Mapping[str, np.ndarray] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def _apply(self, rows: torch.Tensor, fixed: Mapping[str, np.ndarray] | None) -> torch.Tensor:
        for group, part in (fixed or {}).items():
            rows[:, self.layout.slices[group]] = torch.from_numpy(np.asarray(part, np.float32))
        return rows


class JointLabels(LabelDistribution):
    """The empirical joint distribution of a table's label vectors: ``rows`` (K, dim) 0/1 with ``weights`` (K,)."""

    kind = "joint"

    def __init__(self, layout: LabelLayout, rows: np.ndarray, weights: np.ndarray):
        super().__init__(layout)
        if len(rows) == 0 or float(np.sum(weights)) <= 0:
            raise UserError("the label table is empty; conditional training needs labelled images")
        self.rows = np.asarray(rows, np.float32).reshape(len(rows), layout.dim)
        self.weights = np.asarray(weights, np.float64)

    @classmethod
    def count(cls, layout: LabelLayout, labels: np.ndarray) -> "JointLabels":
        """The distribution of the rows of an (N, dim) label matrix."""
        rows, counts = np.unique(np.asarray(labels, np.float32).reshape(-1, layout.dim), axis=0, return_counts=True)
        return cls(layout, rows, counts)

    def sample(self, n, generator, fixed=None):
        weights = self.weights
        if fixed:
            # Draw the other groups from the rows that agree with the fixed ones (an effusion's view, sex and age
            # as in effusion films); when no row agrees, from all rows.
            agree = np.ones(len(self.rows), bool)
            for group, part in fixed.items():
                agree &= np.all(self.rows[:, self.layout.slices[group]] == np.asarray(part, np.float32), axis=1)
            if agree.any():
                weights = np.where(agree, weights, 0.0)
        index = torch.multinomial(torch.from_numpy(weights), n, replacement=True, generator=generator)
        return self._apply(torch.from_numpy(self.rows)[index].clone(), fixed)

    def to_json(self):
        return {"kind": self.kind, "groups": list(self.layout.groups),
                "rows": [np.flatnonzero(r).tolist() for r in self.rows], "weights": self.weights.tolist()}


class MarginalLabels(LabelDistribution):
    """Independent groups: each finding present with its own probability, each one-hot group categorical (the
    mass its values leave below 1 is 'unknown', the zero vector). ``probs`` is (dim,)."""

    kind = "marginal"

    def __init__(self, layout: LabelLayout, probs: np.ndarray):
        super().__init__(layout)
        self.probs = np.asarray(probs, np.float64).reshape(layout.dim)

    def sample(self, n, generator, fixed=None):
        rows = torch.zeros(n, self.layout.dim)
        for group, sl in self.layout.slices.items():
            p = torch.from_numpy(self.probs[sl])
            if group == "findings":
                rows[:, sl] = (torch.rand(n, len(p), generator=generator, dtype=torch.float64) < p).float()
                continue
            choices = torch.cat([p, (1.0 - p.sum()).clamp(min=0.0).reshape(1)])
            pick = torch.multinomial(choices, n, replacement=True, generator=generator)
            rows[:, sl] = torch.nn.functional.one_hot(pick, len(p) + 1)[:, : len(p)].float()
        return self._apply(rows, fixed)

    def to_json(self):
        return {"kind": self.kind, "groups": list(self.layout.groups), "probs": self.probs.tolist()}


def distribution_from_json(state: Mapping[str, Any]) -> LabelDistribution:
    layout = LabelLayout.of(state["groups"])
    if state["kind"] == JointLabels.kind:
        rows = np.zeros((len(state["rows"]), layout.dim), np.float32)
        for i, on in enumerate(state["rows"]):
            rows[i, on] = 1.0
        return JointLabels(layout, rows, np.asarray(state["weights"]))
    if state["kind"] == MarginalLabels.kind:
        return MarginalLabels(layout, np.asarray(state["probs"]))
    raise UserError(f"label distribution of kind {state['kind']!r} is unknown to this MedSynGAN")


# ---------------------------------------------------------------------- public frequencies
def public_labels(layout: LabelLayout, table: str | Path) -> JointLabels:
    """The joint label distribution of every film of a public label table (no privacy cost): an NIH Data_Entry CSV
    (the metadata of the whole release), or a prepared dataset folder of public or consented films (a donated
    tuning set), whose population may match the hospitals' better than the whole release does."""
    path = Path(table)
    listing = path / INDEX_FILE if path.is_dir() else path
    if not listing.is_file():
        raise UserError(f"train.label_table = {table}: not found; point it at the NIH release's "
                        "Data_Entry_2017_v2020.csv (public metadata) or at a prepared dataset of public films")
    stat = listing.stat()
    return _public_labels(layout, str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _public_labels(layout: LabelLayout, path: str, size: int, mtime: int) -> JointLabels:
    meta = _metadata(path, size, mtime)
    return JointLabels.count(layout, layout.encode_records(meta.labels, meta.views, meta.sexes, meta.ages))


@functools.lru_cache(maxsize=1)
def _metadata(path: str, _size: int, _mtime: int):
    from medsyngan.data.nih import read_metadata

    return PreparedDataset.open(path) if Path(path).is_dir() else read_metadata(Path(path))


def training_labels(cfg: Config, dataset: PreparedDataset, origin: str = "the training set") -> np.ndarray | None:
    """The label vectors (N, dim) of a dataset's images for ``cfg.model.condition``; None for an unconditional model.
    A one-hot group that no image has a value for is an error: the model could not learn it."""
    layout = LabelLayout.of(cfg.model.condition)
    if not layout.dim:
        return None
    labels = layout.encode_records(dataset.labels, dataset.views, dataset.sexes, dataset.ages)
    for group in layout.one_hot_groups:
        if len(labels) and not labels[:, layout.slices[group]].any():
            raise UserError(f"model.condition includes '{group}' but no image of {origin} has one (prepare the data "
                            f"from a source that records it, or drop '{group}' from model.condition)")
    return labels


def plain_label_source(cfg: Config, labels: np.ndarray | None) -> LabelDistribution:
    """The label source that needs no private release: the public table, or (without DP) the training data's own
    label frequencies (under DP those are released by :func:`medsyngan.privacy.dp.enable_dp`)."""
    layout = LabelLayout.of(cfg.model.condition)
    if cfg.train.label_source == "public":
        table = Path(cfg.train.label_table or default_label_table())
        if cfg.privacy.dp and cfg.data.path and table.resolve() == Path(cfg.data.path).resolve():
            raise UserError(f"train.label_table = {table} is the training data itself (data.path): its label "
                            "frequencies are private; under DP set train.label_source = 'data' (released with "
                            "noise, part of ε) or point the table at public films")
        return public_labels(layout, table)
    if cfg.privacy.dp or labels is None:
        raise ValueError("the training data's label frequencies need the labels, and under DP a private release")
    return JointLabels.count(layout, labels)


def default_label_table() -> Path:
    """The NIH metadata of the shared sample (``MEDSYNGAN_NIH_DIR`` or ``../shared/data``), for an empty
    ``train.label_table``."""
    from medsyngan.data.shared import nih_sample_dir

    return nih_sample_dir() / "Data_Entry_2017_v2020.csv"


def describe_source(source: str, table: str, dp: bool, noise: float) -> str:
    """One line for logs, `medsyngan privacy` and run records: where generated labels come from."""
    if source == "public":
        return f"public label frequencies of {table or default_label_table()} (no privacy cost)"
    if dp:
        return (f"the training data's label frequencies, released once per hospital under the Gaussian mechanism "
                f"(σ = {noise:g}; part of target ε)")
    return "the training data's own label frequencies (not private)"


