"""The metric registry: each metric alone on small sets, its protocol keys and definitions, names, needs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medsyngan.errors import UserError
from medsyngan.metrics import evaluate, fid, registry
from medsyngan.metrics.classifier import ClassifierSettings
from medsyngan.metrics.context import Features, MetricContext, MetricOptions, MetricResult, NotApplicable
from medsyngan.metrics.definitions import definition
from medsyngan.metrics.evaluate import Evaluation, evaluate_snapshots
from medsyngan.metrics.features import RandomExtractor
from medsyngan.metrics.images import read_image_folder
from medsyngan.metrics.pixel import NearestNeighbours
from medsyngan.metrics.registry import METRICS, Metric, get_metric, parse_metrics, register_metric
from medsyngan.metrics.reidentification import VerifierSettings

N = 16
FPRS = ("1e-2", "1e-3")
EXPECTED_KEYS = {
    "fd": {f"fd{N}_64_random"},
    "kid": {f"kid{N}_64_random", f"kid{N}_64_random_std"},
    "prdc": {f"precision{N}_64_random_k3", f"recall{N}_64_random_k3", f"density{N}_64_random_k5",
             f"coverage{N}_64_random_k5"},
    "nn": {"ssim_nn_train", "ssim_nn_train_max", "psnr_nn_train", "mse_nn_train", "near_copies_ssim0.95"},
    "msssim": {"msssim_div_fake", "msssim_div_real"},
    "privacy": {"dcr_ratio_pixel", "dcr_median_synth_pixel", "dcr_median_holdout_pixel", "dcr_ratio_random",
                "mia_ganleaks_pixel_auc", "mia_logan_auc", "dp_epsilon", "dp_delta", "mia_bound_auc",
                "mia_ganleaks_pixel_auc_reference",
                *(f"mia_{a}_tpr_fpr{f}" for a in ("ganleaks_pixel", "logan", "bound") for f in FPRS)},
    "utility": {f"auroc_{k}{b}" for b in ("", "_lo", "_hi") for k in (
        *(f"{kind}_{label}" for kind in (f"synth{N}_64", f"real{N}_64", f"dp{N}_64_eps1", f"fidelity{N}_64")
          for label in ("view_pa", "nodule", "mean")),
        f"gap_real_synth{N}_64_mean", f"gap_dp_synth{N}_64_eps1_mean", f"augment{N}_64_nodule",
        f"augment{N}_64_rare_mean", f"real{N}_64_rare_mean", f"gap_real_augment{N}_64_rare_mean")},
    "detectability": {f"c2st_auroc{N}_64", f"c2st_auroc{N}_64_lo", f"c2st_auroc{N}_64_hi"},
    "reidentification": {"reid_synth_rate_fmr5e-2", "reid_holdout_rate_fmr5e-2", "reid_synth_max_score",
                         "reid_verifier_auc"},
    "ppl": {"ppl_zfull100_64_lpips"},
    "ppl_randomfeat": {"ppl_zfull100_64_randomfeat"},
}


class ZImage(torch.nn.Module):
    """G(z) = z laid out as a 64×64 image: its path length under mean-squared distance is the slerp angle²."""

    z_dim = 64 * 64

    def forward(self, z):
        return z.view(-1, 1, 64, 64)


class MeanSquare(torch.nn.Module):
    """Stands in for LPIPS (a distance per image pair), whose weights the tests do not download."""

    def forward(self, a, b):
        return ((a - b) ** 2).flatten(1).mean(1)


@pytest.fixture(scope="module")
def images(nih_dir):
    return read_image_folder(nih_dir / "images-64")


def _context(images, **kwargs) -> MetricContext:
    """16 synthetic, 16 real, 16 training images; the first two synthetic images are copies of training ones."""
    discriminator = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 * 64, 1))
    sets = dict(fake=images[:N], real=images[N : 2 * N], train=np.concatenate([images[2 * N : 3 * N - 2], images[:2]]),
                real_patients=np.arange(N), train_patients=np.arange(N - 1, 2 * N - 1), generator=ZImage(),
                discriminator=discriminator, epsilon=1.0, delta=1e-5, options=MetricOptions(ppl_samples=100))
    return MetricContext(**{**sets, **kwargs})


def _labelled_context(images, name: str) -> MetricContext:
    """:func:`_context` with what the classifier metrics need, at sizes that train in a second: labels (the second
    one rare on the training films), public verifier films of 8 patients, a reference generator's samples."""
    real_labels = np.stack([np.arange(N) % 2, np.arange(N) < 4], axis=1).astype(float)
    train_labels = np.stack([np.arange(N) % 2, np.arange(N) == 0], axis=1).astype(float)
    options = MetricOptions(ppl_samples=100, bootstrap=50, utility_min_patients=2, reid_false_match_rate=0.05,
                            classifier=ClassifierSettings(width=4, epochs=1, batch_size=4, min_steps=5),
                            dp_classifier=ClassifierSettings(width=4, epochs=1, batch_size=4, min_steps=5),
                            verifier=VerifierSettings(width=4, embedding=8, steps=5, patients=4))
    extra = dict(fake_labels=real_labels, real_labels=real_labels, train_labels=train_labels,
                 label_names=("view_pa", "nodule"), verifier_images=images[3 * N : 4 * N],
                 verifier_patients=np.repeat(np.arange(N // 2), 2), reference_fake=images[4 * N : 5 * N],
                 options=options)
    if name == "reidentification":  # the audit refuses held-out patients that trained; two films per patient
        extra.update(train_patients=np.arange(100, 100 + N), real_patients=np.arange(N) // 2)
    return _context(images, **extra)


def test_the_expected_keys_cover_every_registered_metric():
    assert set(EXPECTED_KEYS) == set(METRICS)


@pytest.mark.parametrize("name", list(EXPECTED_KEYS))
def test_each_metric_runs_alone_and_returns_defined_protocol_keys(name, images, medsyngan_cache, monkeypatch):
    monkeypatch.setattr(registry, "load_lpips", lambda device: MeanSquare())
    result = METRICS[name](_labelled_context(images, name))
    assert isinstance(result, MetricResult)
    assert set(result.values) == EXPECTED_KEYS[name]
    assert all(math.isfinite(v) for v in result.values.values()), result.values
    assert [k for k in result.values if not definition(k)] == []


def test_metric_values_are_the_underlying_measures(images, medsyngan_cache, monkeypatch):
    monkeypatch.setattr(registry, "load_lpips", lambda device: MeanSquare())
    ctx = _context(images)
    net = RandomExtractor()
    assert METRICS["fd"](ctx).values[f"fd{N}_64_random"] == pytest.approx(
        fid.fd_from_features(net(ctx.real), net(ctx.fake)), rel=1e-6)

    nn = METRICS["nn"](ctx)
    assert isinstance(nn.detail, NearestNeighbours)
    assert nn.values["near_copies_ssim0.95"] == 2 and list(nn.detail.ssim_index[:2]) == [N - 2, N - 1]

    audit = METRICS["privacy"](ctx)
    assert set(audit.detail.dcr) == {"pixel", "random"}
    assert [a.name for a in audit.detail.attacks] == ["ganleaks_pixel", "logan"]
    assert audit.protocol == {"feature_extractor": "random", "holdout_train_patient_overlap": 1}

    # ZImage under a mean-squared distance: the slerp angle squared, π/2 for independent 4096-d Gaussians
    assert METRICS["ppl"](ctx).values["ppl_zfull100_64_lpips"] == pytest.approx((math.pi / 2) ** 2, rel=0.05)


def test_unknown_metric_is_one_line_listing_the_known_ones(images):
    for call in (lambda: parse_metrics("fd,sharpness"), lambda: get_metric("sharpness"),
                 lambda: evaluate(images[:4], images[4:8], metrics="sharpness")):
        with pytest.raises(UserError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and "'sharpness'" in message
        assert all(name in message for name in METRICS)


def test_default_all_and_the_fid_alias():
    assert parse_metrics("default") == parse_metrics("") == [n for n in METRICS if n != "ppl"]
    assert parse_metrics("all") == list(METRICS)
    assert parse_metrics("FID, fd ,kid") == ["fd", "kid"]
    assert parse_metrics(["nn", "all"])[0] == "nn"


def test_missing_inputs_make_a_metric_not_applicable(images, medsyngan_cache):
    ctx = _context(images, train=None, generator=None)
    for name, hint in (("nn", "--train"), ("privacy", "--train"), ("ppl_randomfeat", "generator")):
        with pytest.raises(NotApplicable, match=hint):
            METRICS[name](ctx)
    ev = evaluate(images[:8], images[8:16], metrics="nn,msssim,ppl_randomfeat", msssim_pairs=10)
    assert ev.not_applicable == {"nn", "ppl_randomfeat"} and ev.failed == {}
    assert set(ev.metrics) == EXPECTED_KEYS["msssim"]


def test_a_metric_declares_the_labels_it_needs(images):
    def positive_share(ctx: MetricContext) -> MetricResult:
        return MetricResult({"real_positive_share": float(ctx.real_labels.mean())})

    metric = Metric("label_share", positive_share, needs=("real_labels",))
    ev = Evaluation()
    ev.run(metric, _context(images))
    assert ev.skipped == {"label_share": "needs the labels of the real evaluation films"}
    assert ev.not_applicable == {"label_share"}
    labels = np.zeros((N, 3))
    labels[:4, 0] = 1
    ev.run(metric, _context(images, real_labels=labels))
    assert ev.metrics == {"real_positive_share": pytest.approx(4 / (3 * N))}


def test_the_context_checks_its_sets_and_labels(images):
    with pytest.raises(UserError, match="the synthetic set is empty"):
        MetricContext(images[:0], images[:4])
    with pytest.raises(UserError, match="differ in resolution"):
        MetricContext(images[:4], images[4:8, ::2, ::2])
    with pytest.raises(UserError, match="real_labels has 3 rows for 16 real images"):
        _context(images, real_labels=np.zeros((3, 2)))
    with pytest.raises(UserError, match="train_labels has 2 rows for 0 train images"):
        _context(images, train=None, train_labels=np.zeros((2, 2)))


def test_registration_checks_names_and_needs():
    with pytest.raises(ValueError, match="already registered"):
        register_metric("fd")(lambda ctx: MetricResult({}))
    with pytest.raises(ValueError, match="colour"):
        register_metric("tint", needs=("colour",))
    assert "tint" not in METRICS and METRICS["fd"].fn is registry.frechet_distance


def test_a_feature_network_that_cannot_load_skips_only_what_needs_it(images, tmp_path, medsyngan_cache):
    ctx = _context(images, features=Features(str(tmp_path / "missing.pt")))
    ev = Evaluation()
    for name in ("fd", "kid", "privacy"):
        ev.run(METRICS[name], ctx)
    assert set(ev.failed) == {"fd", "kid"} and ev.skipped["fd"] == ev.skipped["kid"]
    assert "missing.pt not found" in ev.skipped["fd"]
    assert set(ev.dcr) == {"pixel"} and "dcr_ratio_pixel" in ev.metrics
    assert "feature_extractor" not in ev.protocol


def test_snapshots_use_the_registered_fd_and_kid(images, tmp_path, medsyngan_cache, monkeypatch):
    from medsyngan.training import generate

    sets = {"step-000010": images[:N], "step-000020": images[N : 2 * N]}

    def load_generator(path, device, key):
        if path.name not in sets:
            raise UserError(f"{path.name}: damaged checkpoint")
        return path.name, {"step": int(path.name.split("-")[1])}

    monkeypatch.setattr(generate, "load_generator", load_generator)
    monkeypatch.setattr(generate, "generate_images", lambda name, count, seed, **kw: sets[name][:count])
    real = images[2 * N : 3 * N]
    extractor = RandomExtractor()
    rows = evaluate_snapshots([tmp_path / n for n in (*sets, "step-000030")], real, extractor, N)
    assert [r["step"] for r in rows] == [10, 20]
    for row, fake in zip(rows, sets.values()):
        ctx = MetricContext(fake, real, options=MetricOptions(kid_subsets=20))
        expected = {**METRICS["fd"](ctx).values, f"kid{N}_64_random": METRICS["kid"](ctx).values[f"kid{N}_64_random"]}
        assert {k: v for k, v in row.items() if k not in ("step", "checkpoint")} == pytest.approx(expected)
