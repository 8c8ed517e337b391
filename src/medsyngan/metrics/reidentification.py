"""Re-identification audit: does a synthetic film verify as one of the training patients?

Packhäuser et al. (2022, Sci. Rep.) showed that a siamese network recognises a patient across chest films taken
years apart, so a synthetic film can leak who was in the training set even when no pixel is copied. The audit
(after Packhäuser et al. and CheXGenBench):

1. **A verifier that never saw a training patient.** A siamese :class:`Verifier` (the
   :class:`~medsyngan.metrics.classifier.SmallCNN`, an L2-normalised embedding, score = cosine similarity) learns
   to match films of one patient against films of others (:func:`train_verifier`) on public films
   (``verifier_images``, e.g. the COVID-19 CXR set) plus one half of the held-out real patients, drawn by
   ``seed``. It is cached by a hash of those films, their patient ids, its settings and the seed, and trained
   once per such set.
2. **Calibration.** The other half of the held-out patients (the audit half; at most
   :data:`CALIBRATION_FILMS` of its films) gives every pair of films of different patients; the threshold is the
   (1 − FMR) quantile of their scores, so that a film of one real patient verifies as another real patient with
   the false-match rate FMR (default 1e-3). The same pairs give the verifier's AUC on same- against
   different-patient pairs: a verifier near 0.5 makes the audit uninformative.
3. **Audit.** Each synthetic film is scored against every training patient (the best score over that patient's
   films); it *verifies as a training patient* when the best score exceeds the threshold. The reference is the
   same rate for the audit half's real films, which belong to no training patient: synthetic films should not
   verify more often than real strangers do. An exact copy of a training film scores 1, the highest possible.

The worst cases (synthetic film, training film, patient, score) are the report's panels beside the
nearest-neighbour ones.

The audit is only as sharp as its verifier. Trained on the COVID-19 CXR set (71 patients) and half of the NIH
sample's 50 evaluation patients at 64 px, it reaches an AUC of about 0.8 on held-out patients' same- against
different-patient pairs (Packhäuser et al. reach 0.99 with tens of thousands of patients at 256 px); at a
false-match rate of 1e-3 it flags every copy of a training film, but follow-up films of training patients
(47 %) barely more often than films of strangers (44 %, each compared with ~450 training films). A leak short of
copying is seen only by a sharper verifier; ``reid_verifier_auc`` states each audit's figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsyngan.errors import UserError
from medsyngan.metrics.auroc import auroc
from medsyngan.metrics.classifier import (SmallCNN, cache_key, cached_network, fixed_threads, random_shift, seeded,
                                          to_input)

FALSE_MATCH_RATE = 1e-3
WORST = 8
CALIBRATION_FILMS = 2000  # at most this many audit films form the calibration pairs (two million pairs)


@dataclass(frozen=True)
class VerifierSettings:
    width: int = 16
    embedding: int = 64
    steps: int = 600
    patients: int = 32  # patients per step, two films of each
    temperature: float = 0.1
    lr: float = 2e-3
    weight_decay: float = 1e-4
    shift: float = 3.0  # pixels; follow-up films are never positioned alike
    zoom: float = 0.05
    exposure: float = 0.2  # largest change of contrast and of brightness (on [-1, 1]); nor exposed alike


class Verifier(nn.Module):
    """Siamese verifier: one embedding network for every film; two films' score is their embeddings' cosine."""

    def __init__(self, settings: VerifierSettings):
        super().__init__()
        self.net = SmallCNN(settings.embedding, settings.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


def _exposure(x: torch.Tensor, amount: float, gen: torch.Generator) -> torch.Tensor:
    gain, offset = ((torch.rand(2, len(x), 1, 1, 1, generator=gen) * 2 - 1) * amount).unbind(0)
    return (x * (1 + gain) + offset).clamp(-1, 1)


@fixed_threads
def train_verifier(images_u8: np.ndarray, patients: np.ndarray, settings: VerifierSettings, seed: int) -> Verifier:
    """A :class:`Verifier` trained with a supervised contrastive loss (InfoNCE): each step takes two films of each
    of ``settings.patients`` patients, and each film must pick its patient's other film out of the batch by
    cosine / temperature — every other patient's film in the batch is a different-patient pair."""
    _, codes = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
    multi = [films for films in (np.flatnonzero(codes == p) for p in range(codes.max(initial=-1) + 1))
             if len(films) > 1]
    if len(multi) < 2:
        raise UserError(f"the re-identification verifier needs at least 2 patients with 2 or more films; it has "
                        f"{len(multi)}: give public films with patient ids (e.g. the COVID-19 CXR set)")
    x = to_input(images_u8)
    net = seeded(seed, lambda: Verifier(settings))
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    count = min(settings.patients, len(multi))
    sibling = torch.cat([torch.arange(count, 2 * count), torch.arange(count)])
    net.train()
    for _ in range(settings.steps):
        pairs = np.array([rng.choice(multi[i], 2, replace=False) for i in rng.choice(len(multi), count, replace=False)])
        films = torch.from_numpy(np.r_[pairs[:, 0], pairs[:, 1]])
        e = net(_exposure(random_shift(x[films], settings.shift, gen, settings.zoom), settings.exposure, gen))
        similarity = (e @ e.T / settings.temperature).fill_diagonal_(float("-inf"))
        loss = F.cross_entropy(similarity, sibling)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def embed(verifier: Verifier, images_u8: np.ndarray, batch: int = 256) -> np.ndarray:
    """Unit embeddings [N, D] (cosine similarity = dot product)."""
    verifier.eval()
    chunks = [verifier(to_input(images_u8[s : s + batch])) for s in range(0, len(images_u8), batch)]
    return torch.cat(chunks).double().numpy() if chunks else np.zeros((0, 0))


def cached_verifier(images_u8: np.ndarray, patients: np.ndarray, settings: VerifierSettings, seed: int) -> Verifier:
    """:func:`train_verifier`, trained once per (films, patient ids, settings, seed)."""
    key = cache_key("verifier", settings, seed, images_u8, np.asarray(patients, dtype=str))
    net, _ = cached_network(key, lambda: seeded(seed, lambda: Verifier(settings)),
                            lambda: (train_verifier(images_u8, patients, settings, seed), {}))
    return net  # type: ignore[return-value]


@dataclass(frozen=True)
class Match:
    """A synthetic film and the training film it resembles most (indices into the sets as given)."""

    synthetic: int
    train: int
    patient: str
    score: float


@dataclass
class ReidentificationResult:
    threshold: float
    false_match_rate: float  # the target FMR the threshold was set for
    calibration_pairs: int
    calibration_rate: float  # FMR reached on the calibration pairs
    verifier_auc: float  # same- vs different-patient pairs of the audit half (NaN without same-patient pairs)
    synthetic_scores: np.ndarray  # best score of each synthetic film over all training patients
    synthetic_match: np.ndarray  # the training film giving it
    holdout_scores: np.ndarray  # the same for the audit half's real films
    worst: list[Match]
    verifier_films: int
    verifier_patients: int
    audit_patients: int

    @property
    def synthetic_rate(self) -> float:
        return float(np.mean(self.synthetic_scores > self.threshold))

    @property
    def holdout_rate(self) -> float:
        return float(np.mean(self.holdout_scores > self.threshold))

    def values(self, fmr_tag: str) -> dict[str, float]:
        out = {f"reid_synth_rate_fmr{fmr_tag}": self.synthetic_rate,
               f"reid_holdout_rate_fmr{fmr_tag}": self.holdout_rate,
               "reid_synth_max_score": float(self.synthetic_scores.max())}
        if np.isfinite(self.verifier_auc):
            out["reid_verifier_auc"] = self.verifier_auc
        return out

    def protocol(self) -> dict[str, float | int]:
        return {"reid_threshold": self.threshold, "reid_calibration_pairs": self.calibration_pairs,
                "reid_calibration_false_match_rate": self.calibration_rate, "reid_verifier_films": self.verifier_films,
                "reid_verifier_patients": self.verifier_patients, "reid_audit_patients": self.audit_patients}


def _best_match(queries: np.ndarray, train: np.ndarray, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Each query's highest score against the training films, and that film's index."""
    scores, index = np.zeros(len(queries)), np.zeros(len(queries), np.int64)
    for s in range(0, len(queries), block):
        block_scores = queries[s : s + block] @ train.T
        scores[s : s + block], index[s : s + block] = block_scores.max(axis=1), block_scores.argmax(axis=1)
    return scores, index


def _split_patients(patients: np.ndarray, seed: int) -> np.ndarray:
    """True for the films of the half of the patients that joins the verifier's training set."""
    ids = np.unique(patients)
    joins = np.random.default_rng(seed).permutation(len(ids))[: len(ids) // 2]
    return np.isin(patients, ids[joins])


def reidentification_audit(fake: np.ndarray, train: np.ndarray, train_patients: np.ndarray, real: np.ndarray,
                           real_patients: np.ndarray, verifier_images: np.ndarray | None = None,
                           verifier_patients: np.ndarray | None = None, settings: VerifierSettings = VerifierSettings(),
                           false_match_rate: float = FALSE_MATCH_RATE, worst: int = WORST, seed: int = 0
                           ) -> ReidentificationResult:
    """The audit of the module docstring. Patient ids of the three real sets must not overlap."""
    train_ids, real_ids = np.asarray(train_patients, dtype=str), np.asarray(real_patients, dtype=str)
    public_ids = np.zeros(0, str) if verifier_patients is None else np.asarray(verifier_patients, dtype=str)
    for name, ids in (("held-out real", real_ids), ("verifier", public_ids)):
        shared = np.intersect1d(ids, train_ids)
        if len(shared):
            raise UserError(f"{len(shared)} {name} patients (e.g. {shared[0]}) are training patients; the "
                            "re-identification audit needs films of other patients there")
    if not 0 < false_match_rate < 1:
        raise UserError(f"false-match rate {false_match_rate:g} must lie in (0, 1); 1e-3 is the usual choice")
    joins = _split_patients(real_ids, seed)
    audit, audit_ids = real[~joins], real_ids[~joins]
    calibration = np.sort(np.random.default_rng(seed).permutation(len(audit))[:CALIBRATION_FILMS])
    upper = np.triu_indices(len(calibration), k=1)
    same = audit_ids[calibration][upper[0]] == audit_ids[calibration][upper[1]]
    needed = int(np.ceil(1 / false_match_rate))
    if (~same).sum() < needed:
        raise UserError(f"calibrating a false-match rate of {false_match_rate:g} needs {needed} pairs of films of "
                        f"different held-out patients; the audit half has {(~same).sum()} — give more held-out "
                        "real films or raise the false-match rate")
    films = real[joins] if verifier_images is None else np.concatenate([verifier_images, real[joins]])
    ids = np.r_[[f"public:{p}" for p in public_ids], [f"holdout:{p}" for p in real_ids[joins]]]
    verifier = cached_verifier(films, ids, settings, seed)

    e_audit, e_train, e_fake = embed(verifier, audit), embed(verifier, train), embed(verifier, fake)
    pair_scores = (e_audit[calibration] @ e_audit[calibration].T)[upper]
    different = pair_scores[~same]
    threshold = float(np.quantile(different, 1 - false_match_rate, method="higher"))
    fake_best, fake_match = _best_match(e_fake, e_train)
    holdout_best, _ = _best_match(e_audit, e_train)
    order = np.argsort(-fake_best, kind="stable")[:worst]
    matches = [Match(int(i), int(fake_match[i]), str(train_ids[fake_match[i]]), float(fake_best[i])) for i in order]
    verifier_auc = auroc(pair_scores, same.astype(float)) if same.any() else float("nan")
    return ReidentificationResult(
        threshold, false_match_rate, len(different), float(np.mean(different > threshold)), verifier_auc,
        fake_best, fake_match, holdout_best, matches, len(films), len(np.unique(ids)), len(np.unique(audit_ids)))
