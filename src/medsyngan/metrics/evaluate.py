"""One evaluation: every requested metric on a synthetic set against real sets, named by its protocol.

Sets: ``fake`` (synthetic), ``real`` (real images the model did not train on — the reference distribution and,
for the privacy audit, the holdout / non-members) and optionally ``train`` (the training images — the
memorization and membership references). A metric that cannot be computed (too few images, missing weights)
is recorded in ``Evaluation.skipped`` with its one-line reason and the others still run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsyngan.errors import UserError
from medsyngan.metrics import fid, pixel, prdc, privacy_audit
from medsyngan.metrics.features import FeatureExtractor, RandomExtractor, cached_features, extract, make_extractor
from medsyngan.metrics.images import check_same_resolution

log = logging.getLogger("medsyngan")

GROUPS = ("fd", "kid", "prdc", "nn", "msssim", "privacy", "ppl", "ppl_randomfeat")
DEFAULT_GROUPS = ("fd", "kid", "prdc", "nn", "msssim", "privacy", "ppl_randomfeat")
FEATURE_GROUPS = {"fd", "kid", "prdc"}
PR_K, DC_K = 3, 5


class _NotApplicable(UserError):
    """The inputs do not allow this metric (e.g. no training set); not an error of the evaluation."""


def parse_metrics(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """'default' (everything that needs no download), 'all', or a comma-separated list of groups
    (fid is an alias of fd)."""
    items = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    out: list[str] = []
    for item in items or ["default"]:
        expanded = {"default": DEFAULT_GROUPS, "all": GROUPS, "fid": ("fd",)}.get(item, (item,))
        for group in expanded:
            if group not in GROUPS:
                raise UserError(f"unknown metric '{item}'; use default, all, or a list of: {', '.join(GROUPS)}")
            if group not in out:
                out.append(group)
    return out


def count_tag(n: int) -> str:
    """Sample count in a metric name: 5000 → '5k', 690 → '690'."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def fpr_tag(fpr: float) -> str:
    return f"{fpr:.0e}".replace("e-0", "e-")


@dataclass
class Evaluation:
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    nn: pixel.NearestNeighbours | None = None
    nn_threshold: float = 0.95
    dcr: dict[str, privacy_audit.DcrResult] = field(default_factory=dict)
    attacks: list[privacy_audit.AttackResult] = field(default_factory=list)
    epsilon: float | None = None
    delta: float | None = None

    not_applicable: set[str] = field(default_factory=set)

    def skip(self, group: str, reason: str, applicable: bool = True) -> None:
        """Record a metric that was not computed; ``applicable=False`` when the inputs simply do not allow it
        (no training set, no generator), as opposed to a failure (too few images, missing weights)."""
        self.skipped[group] = reason
        if not applicable:
            self.not_applicable.add(group)
        log.warning("%s skipped: %s", group, reason)

    @property
    def failed(self) -> dict[str, str]:
        return {g: r for g, r in self.skipped.items() if g not in self.not_applicable}


class _Features:
    """Features of each set, computed once and only when a metric asks for them."""

    def __init__(self, extractor: FeatureExtractor, sets: dict[str, np.ndarray | None], batch_size: int):
        self.extractor, self.sets, self.batch_size = extractor, sets, batch_size
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            images = self.sets[name]
            assert images is not None
            if name == "fake":  # synthetic sets change with every snapshot: not worth caching
                self._cache[name] = extract(self.extractor, images, self.batch_size, f"features: {name}")
            else:
                self._cache[name] = cached_features(self.extractor, images, self.batch_size, f"features: {name}")
        return self._cache[name]


def evaluate(
    fake_u8: np.ndarray,
    real_u8: np.ndarray,
    train_u8: np.ndarray | None = None,
    *,
    metrics: str | list[str] = "default",
    feature_extractor: str | FeatureExtractor = "random",
    generator: torch.nn.Module | None = None,
    discriminator: torch.nn.Module | None = None,
    epsilon: float | None = None,
    delta: float | None = None,
    real_patients: np.ndarray | None = None,
    train_patients: np.ndarray | None = None,
    nn_threshold: float = 0.95,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    msssim_pairs: int = 1000,
    ppl_samples: int = 2000,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Evaluation:
    """Images are uint8 [N, S, S] at one resolution. ``generator`` enables PPL, ``discriminator`` the LOGAN
    attack, ``epsilon``/``delta`` the DP bound beside the attacks; ``*_patients`` check that the holdout is
    patient-disjoint from the training set."""
    groups = parse_metrics(metrics)
    fake_u8, real_u8 = np.asarray(fake_u8), np.asarray(real_u8)
    train_u8 = None if train_u8 is None else np.asarray(train_u8)
    for name, arr in (("synthetic", fake_u8), ("real", real_u8)):
        if len(arr) == 0:
            raise UserError(f"the {name} set is empty; give at least one image")
    res = check_same_resolution(synthetic=fake_u8, real=real_u8, train=train_u8)
    ev = Evaluation(nn_threshold=nn_threshold, epsilon=epsilon, delta=delta)
    ev.protocol = {
        "synthetic": len(fake_u8), "real": len(real_u8), "train": 0 if train_u8 is None else len(train_u8),
        "resolution": res, "seed": seed, "metrics": groups,
    }
    m = ev.metrics

    feats: _Features | None = None
    tag = ""
    if FEATURE_GROUPS & set(groups) or "privacy" in groups:
        try:
            extractor = (
                feature_extractor if isinstance(feature_extractor, FeatureExtractor)
                else make_extractor(feature_extractor, device, seed=0)
            )
            tag = extractor.tag
            ev.protocol["feature_extractor"] = tag
            feats = _Features(extractor, {"fake": fake_u8, "real": real_u8, "train": train_u8}, batch_size)
        except UserError as exc:
            for group in sorted(FEATURE_GROUPS & set(groups)):
                ev.skip(group, str(exc))
    base = f"{count_tag(len(fake_u8))}_{res}_{tag}"

    def run(group: str, fn) -> None:
        if group not in groups or group in ev.skipped:
            return
        try:
            fn()
        except _NotApplicable as exc:
            ev.skip(group, str(exc), applicable=False)
        except UserError as exc:
            ev.skip(group, str(exc))

    def do_fd() -> None:
        prefix = "fid" if tag == "inception" else "fd"
        m[f"{prefix}{base}"] = fid.fd_from_features(feats["real"], feats["fake"])

    def do_kid() -> None:
        mean, std = fid.kid(feats["real"], feats["fake"], kid_subsets, kid_subset_size, seed)
        m[f"kid{base}"], m[f"kid{base}_std"] = mean, std

    def do_prdc() -> None:
        p, r = prdc.precision_recall(feats["real"], feats["fake"], PR_K)
        d, c = prdc.density_coverage(feats["real"], feats["fake"], DC_K)
        m[f"precision{base}_k{PR_K}"], m[f"recall{base}_k{PR_K}"] = p, r
        m[f"density{base}_k{DC_K}"], m[f"coverage{base}_k{DC_K}"] = d, c

    def do_nn() -> None:
        if train_u8 is None:
            raise _NotApplicable("needs the training images (--train)")
        ev.nn = nn = pixel.nearest_neighbours(fake_u8, train_u8, device=device)
        m["ssim_nn_train"] = float(nn.ssim.mean())
        m["ssim_nn_train_max"] = float(nn.ssim.max())
        m["psnr_nn_train"] = float(np.mean(np.minimum(nn.psnr, 100.0)))  # exact copies (∞ dB) counted as 100 dB
        m["mse_nn_train"] = float(nn.mse.mean())
        m[f"near_copies_ssim{nn_threshold:g}"] = float((nn.ssim > nn_threshold).sum())

    def do_msssim() -> None:
        m["msssim_div_fake"] = pixel.ms_ssim_diversity(fake_u8, msssim_pairs, seed)
        m["msssim_div_real"] = pixel.ms_ssim_diversity(real_u8, msssim_pairs, seed)

    def do_privacy() -> None:
        if train_u8 is None:
            raise _NotApplicable("needs the training images (--train) as members and --real as the holdout")
        if real_patients is not None and train_patients is not None:
            overlap = len(set(map(str, real_patients)) & set(map(str, train_patients)))
            ev.protocol["holdout_train_patient_overlap"] = overlap
            if overlap:
                log.warning("%d patients appear in both --real and --train: the holdout is not patient-disjoint", overlap)
        px = {k: privacy_audit.pixel_vectors(v) for k, v in (("fake", fake_u8), ("real", real_u8), ("train", train_u8))}
        ev.dcr["pixel"] = d = privacy_audit.dcr(px["fake"], px["real"], px["train"])
        m["dcr_ratio_pixel"] = d.ratio
        m["dcr_median_synth_pixel"] = float(np.median(d.synthetic_to_train))
        m["dcr_median_holdout_pixel"] = float(np.median(d.holdout_to_train))
        if feats is not None:
            ev.dcr[tag] = d = privacy_audit.dcr(feats["fake"], feats["real"], feats["train"])
            m[f"dcr_ratio_{tag}"] = d.ratio
        attacks = [privacy_audit.gan_leaks(px["train"], px["real"], px["fake"], seed)]
        attacks[0].name = "ganleaks_pixel"
        if discriminator is not None:
            attacks.append(privacy_audit.logan(train_u8, real_u8, discriminator, seed, device=device))
        for attack in attacks:
            ev.attacks.append(attack)
            m[f"mia_{attack.name}_auc"] = attack.auc
            for f in privacy_audit.LOW_FPRS:
                m[f"mia_{attack.name}_tpr_fpr{fpr_tag(f)}"] = attack.tpr_at(f)
        if epsilon is not None:
            dl = 0.0 if delta is None else delta
            m["dp_epsilon"], m["dp_delta"] = float(epsilon), float(dl)
            m["mia_bound_auc"] = privacy_audit.dp_auc_bound(epsilon, dl)
            for f in privacy_audit.LOW_FPRS:
                m[f"mia_bound_tpr_fpr{fpr_tag(f)}"] = float(privacy_audit.dp_tpr_bound(f, epsilon, dl))

    def do_ppl(kind: str) -> None:
        from medsyngan.metrics import ppl

        if generator is None:
            raise _NotApplicable("needs a generator (--run or --checkpoint), not a folder of images")
        if kind == "lpips":
            from medsyngan.metrics.lpips import load_lpips

            distance = ppl.lpips_distance(load_lpips(device=device))
        else:
            distance = ppl.random_feature_distance(RandomExtractor(device).net)
        value, _ = ppl.perceptual_path_length(generator, distance, ppl_samples, batch_size, seed, device)
        m[f"ppl_{ppl.path_kind(generator)}{count_tag(ppl_samples)}_{res}_{kind}"] = value

    run("fd", do_fd)
    run("kid", do_kid)
    run("prdc", do_prdc)
    run("nn", do_nn)
    run("msssim", do_msssim)
    run("privacy", do_privacy)
    run("ppl", lambda: do_ppl("lpips"))
    run("ppl_randomfeat", lambda: do_ppl("randomfeat"))
    return ev


def evaluate_images(fake_u8: np.ndarray, real_u8: np.ndarray, train_u8: np.ndarray | None = None, **kwargs) -> dict[str, float]:
    """The metrics of :func:`evaluate` as a flat ``{protocol-named key: value}`` dict (skipped ones absent)."""
    return evaluate(fake_u8, real_u8, train_u8, **kwargs).metrics


def privacy_from_rows(rows: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """ε and δ of a run from its metrics.jsonl rows: the largest ε logged (ε only grows; with several hospitals
    the federated rows carry the worst one)."""
    eps = [r["epsilon"] for r in rows if isinstance(r.get("epsilon"), (int, float))]
    deltas = [r["delta"] for r in rows if isinstance(r.get("delta"), (int, float))]
    return (max(eps) if eps else None), (max(deltas) if deltas else None)


def snapshot_dirs(run_dir: str | Path) -> list[Path]:
    """The run's saved checkpoint folders (``step-*`` of a centralized run, ``round-*`` of a federation)."""
    from medsyngan.training.checkpoint import snapshot_dirs as checkpoint_folders

    return checkpoint_folders(Path(run_dir) / "checkpoints")


def evaluate_snapshots(
    checkpoints: list[Path], real_u8: np.ndarray, extractor: FeatureExtractor, count: int, seed: int = 0,
    batch_size: int = 64, device: torch.device | str = "cpu", key: bytes | None = None,
) -> list[dict[str, Any]]:
    """FD and KID of ``count`` samples from every checkpoint (a curve over kimg / rounds); a damaged checkpoint
    is reported and skipped. ``key`` opens encrypted checkpoints."""
    from medsyngan.training.generate import generate_images, load_generator

    real_feats = cached_features(extractor, real_u8, batch_size, "features: real")
    rows = []
    for path in checkpoints:
        try:
            G, meta = load_generator(path, device, key)
            fake = generate_images(G, count, seed, batch_size=batch_size, device=device)
            check_same_resolution(synthetic=fake, real=real_u8)
            feats = extract(extractor, fake, batch_size, f"features: {path.name}")
            base = f"{count_tag(count)}_{fake.shape[-1]}_{extractor.tag}"
            row: dict[str, Any] = {k: meta[k] for k in ("step", "kimg", "round") if isinstance(meta.get(k), (int, float))}
            row["checkpoint"] = path.name
            row[f"{'fid' if extractor.tag == 'inception' else 'fd'}{base}"] = fid.fd_from_features(real_feats, feats)
            row[f"kid{base}"] = fid.kid(real_feats, feats, subsets=20, seed=seed)[0]
        except UserError as exc:
            log.warning("snapshot %s skipped: %s", path.name, exc)
            continue
        rows.append(row)
    return rows
