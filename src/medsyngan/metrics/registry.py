"""The metrics by name: each a plain function of a :class:`MetricContext`, registered with what it needs.

Names are what ``--metrics`` and ``evaluate(metrics=...)`` accept; each metric returns keys that carry their
protocol (``fd500_64_random``, ``precision500_64_random_k3``, ``mia_ganleaks_pixel_auc``; see
:mod:`medsyngan.metrics.definitions`). :func:`medsyngan.metrics.evaluate` runs the requested ones in
registration order. To add one::

    @register_metric("sharpness", needs=("fake_labels",))
    def sharpness(ctx: MetricContext) -> MetricResult:
        ...

``needs`` names :class:`MetricContext` fields that must be given; when one is None the metric is recorded as
not applicable with the field's hint. Every key it returns needs a one-line definition in ``definitions.py``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from medsyngan.errors import UserError
from medsyngan.metrics import fid, pixel, ppl, prdc, privacy_audit
from medsyngan.metrics.context import SETS, MetricContext, MetricResult, NotApplicable, protocol_tag
from medsyngan.metrics.detectability import two_sample_test
from medsyngan.metrics.reidentification import reidentification_audit
from medsyngan.metrics.utility import DEFAULT_EPSILON, UtilitySettings, utility_audit
from medsyngan.metrics.features import RandomExtractor
from medsyngan.metrics.lpips import load_lpips

log = logging.getLogger("medsyngan")

MetricFn = Callable[[MetricContext], MetricResult]
CONTEXT_FIELDS = frozenset(f.name for f in dataclasses.fields(MetricContext))
ALIASES = {"fid": "fd"}
PR_K, DC_K = 3, 5


@dataclass(frozen=True)
class Metric:
    name: str
    fn: MetricFn
    needs: tuple[str, ...] = ()
    default: bool = True  # part of 'default': runs without downloading anything

    def __call__(self, ctx: MetricContext) -> MetricResult:
        """The metric on ``ctx``; :class:`NotApplicable` when a field it needs is not given."""
        for need in self.needs:
            reason = ctx.missing(need)
            if reason is not None:
                raise NotApplicable(reason)
        return self.fn(ctx)


METRICS: dict[str, Metric] = {}


def register_metric(name: str, *, needs: tuple[str, ...] = (), default: bool = True) -> Callable[[MetricFn], MetricFn]:
    """Register the decorated function under ``name`` (see the module docstring)."""
    unknown = sorted(set(needs) - CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"metric {name!r} needs {unknown}, which MetricContext does not have")

    def add(fn: MetricFn) -> MetricFn:
        if name in METRICS or name in ALIASES:
            raise ValueError(f"metric {name!r} is already registered")
        METRICS[name] = Metric(name, fn, tuple(needs), default)
        return fn

    return add


def get_metric(name: str) -> Metric:
    metric = METRICS.get(ALIASES.get(name, name))
    if metric is None:
        raise UserError(f"unknown metric '{name}'; use default, all, or a list of: {', '.join(METRICS)}")
    return metric


def parse_metrics(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """'default' (every metric that needs no download), 'all', or a comma-separated list of names
    (fid is an alias of fd); returns registered names, each once."""
    items = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    out: list[str] = []
    for item in items or ["default"]:
        if item == "default":
            names = [m.name for m in METRICS.values() if m.default]
        elif item == "all":
            names = list(METRICS)
        else:
            names = [get_metric(item).name]
        out += [n for n in names if n not in out]
    return out


def fpr_tag(fpr: float) -> str:
    """A false-positive rate in a metric name: 0.001 → '1e-3'."""
    return f"{fpr:.0e}".replace("e-0", "e-")


@register_metric("fd")
def frechet_distance(ctx: MetricContext) -> MetricResult:
    """Fréchet distance between real and synthetic features; named fid… when the network is Inception."""
    tag = ctx.features.tag
    value = fid.fd_from_features(ctx.feats("real"), ctx.feats("fake"))
    return MetricResult({f"{'fid' if tag == 'inception' else 'fd'}{ctx.feature_tag()}": value},
                        {"feature_extractor": tag})


@register_metric("kid")
def kernel_inception_distance(ctx: MetricContext) -> MetricResult:
    """KID: mean and standard deviation of the unbiased MMD² over ``kid_subsets`` random subsets."""
    o = ctx.options
    mean, std = fid.kid(ctx.feats("real"), ctx.feats("fake"), o.kid_subsets, o.kid_subset_size, ctx.seed)
    key = f"kid{ctx.feature_tag()}"
    return MetricResult({key: mean, f"{key}_std": std}, {"feature_extractor": ctx.features.tag})


@register_metric("prdc")
def precision_recall_density_coverage(ctx: MetricContext) -> MetricResult:
    """Precision and recall (k = 3), density and coverage (k = 5) in feature space."""
    real, fake, base = ctx.feats("real"), ctx.feats("fake"), ctx.feature_tag()
    p, r = prdc.precision_recall(real, fake, PR_K)
    d, c = prdc.density_coverage(real, fake, DC_K)
    return MetricResult(
        {f"precision{base}_k{PR_K}": p, f"recall{base}_k{PR_K}": r,
         f"density{base}_k{DC_K}": d, f"coverage{base}_k{DC_K}": c},
        {"feature_extractor": ctx.features.tag},
    )


@register_metric("nn", needs=("train",))
def nearest_training_images(ctx: MetricContext) -> MetricResult:
    """SSIM, PSNR and MSE of each synthetic image to its closest training image; the matches are the detail."""
    assert ctx.train is not None
    nn = pixel.nearest_neighbours(ctx.fake, ctx.train, device=ctx.device)
    threshold = ctx.options.nn_threshold
    return MetricResult({
        "ssim_nn_train": float(nn.ssim.mean()),
        "ssim_nn_train_max": float(nn.ssim.max()),
        "psnr_nn_train": float(np.mean(np.minimum(nn.psnr, 100.0))),  # exact copies (∞ dB) counted as 100 dB
        "mse_nn_train": float(nn.mse.mean()),
        f"near_copies_ssim{threshold:g}": float((nn.ssim > threshold).sum()),
    }, detail=nn)


@register_metric("msssim")
def ms_ssim_diversity(ctx: MetricContext) -> MetricResult:
    """Mean MS-SSIM over random pairs within the synthetic set and within the real set (its reference)."""
    pairs = ctx.options.msssim_pairs
    return MetricResult({
        "msssim_div_fake": pixel.ms_ssim_diversity(ctx.fake, pairs, ctx.seed),
        "msssim_div_real": pixel.ms_ssim_diversity(ctx.real, pairs, ctx.seed),
    })


@register_metric("privacy", needs=("train",))
def privacy(ctx: MetricContext) -> MetricResult:
    """DCR in pixel and feature space, GAN-Leaks (and LOGAN with a discriminator) membership inference with
    training images as members and the real set as holdout, and the (ε, δ)-DP bound when ε is given."""
    assert ctx.train is not None
    protocol: dict[str, object] = {}
    feature_tag = ctx.features.tag if ctx.features.available() else None
    if feature_tag is not None:
        protocol["feature_extractor"] = feature_tag
    if ctx.real_patients is not None and ctx.train_patients is not None:
        overlap = len(set(map(str, ctx.real_patients)) & set(map(str, ctx.train_patients)))
        protocol["holdout_train_patient_overlap"] = overlap
        if overlap:
            log.warning("%d patients appear in both --real and --train: the holdout is not patient-disjoint", overlap)
    px = {name: privacy_audit.pixel_vectors(getattr(ctx, name)) for name in SETS}
    audit = privacy_audit.PrivacyAudit({"pixel": privacy_audit.dcr(px["fake"], px["real"], px["train"])}, [])
    d = audit.dcr["pixel"]
    values = {"dcr_ratio_pixel": d.ratio, "dcr_median_synth_pixel": float(np.median(d.synthetic_to_train)),
              "dcr_median_holdout_pixel": float(np.median(d.holdout_to_train))}
    if feature_tag is not None:
        audit.dcr[feature_tag] = d = privacy_audit.dcr(ctx.feats("fake"), ctx.feats("real"), ctx.feats("train"))
        values[f"dcr_ratio_{feature_tag}"] = d.ratio
    leaks = privacy_audit.gan_leaks(px["train"], px["real"], px["fake"], ctx.seed)
    leaks.name = "ganleaks_pixel"
    audit.attacks.append(leaks)
    if ctx.discriminator is not None:
        audit.attacks.append(privacy_audit.logan(ctx.train, ctx.real, ctx.discriminator, ctx.seed, device=ctx.device))
    for attack in audit.attacks:
        values[f"mia_{attack.name}_auc"] = attack.auc
        values.update({f"mia_{attack.name}_tpr_fpr{fpr_tag(f)}": attack.tpr_at(f) for f in privacy_audit.LOW_FPRS})
    if ctx.reference_fake is not None:
        # the same members and non-members against a generator that never saw the members: what the attack
        # reaches from the distribution shift between training and holdout patients alone
        reference = privacy_audit.gan_leaks(px["train"], px["real"], privacy_audit.pixel_vectors(ctx.reference_fake),
                                            ctx.seed)
        reference.name = "ganleaks_pixel_reference"
        audit.attacks.append(reference)
        values["mia_ganleaks_pixel_auc_reference"] = reference.auc
    if ctx.epsilon is not None:
        values.update(_dp_bound(ctx.epsilon, 0.0 if ctx.delta is None else ctx.delta))
    return MetricResult(values, protocol, audit)


def _dp_bound(epsilon: float, delta: float) -> dict[str, float]:
    """The run's (ε, δ) and the best AUC and low-FPR TPRs any membership attack can reach against it."""
    values = {"dp_epsilon": float(epsilon), "dp_delta": float(delta),
              "mia_bound_auc": privacy_audit.dp_auc_bound(epsilon, delta)}
    for f in privacy_audit.LOW_FPRS:
        values[f"mia_bound_tpr_fpr{fpr_tag(f)}"] = float(privacy_audit.dp_tpr_bound(f, epsilon, delta))
    return values


@register_metric("utility", needs=("fake_labels", "real_labels", "real_patients", "label_names"))
def train_synthetic_test_real(ctx: MetricContext) -> MetricResult:
    """AUROC on the real evaluation patients of classifiers trained on the synthetic films, on the real training
    films, on those with patient-level DP-SGD, and on real plus rare-finding synthetic films (utility.py)."""
    assert ctx.fake_labels is not None and ctx.real_labels is not None and ctx.label_names is not None
    o = ctx.options
    epsilon = o.utility_epsilon or (ctx.epsilon if ctx.epsilon and np.isfinite(ctx.epsilon) else DEFAULT_EPSILON)
    settings = UtilitySettings(o.classifier, o.dp_classifier, o.bootstrap, o.utility_min_patients,
                               o.utility_rare_prevalence, epsilon)
    result = utility_audit(ctx.fake, ctx.fake_labels, ctx.real, ctx.real_labels, ctx.real_patients, ctx.label_names,
                           ctx.train, ctx.train_labels, ctx.train_patients, settings, ctx.seed)
    return MetricResult(result.values(), result.protocol(), result)


@register_metric("detectability")
def classifier_two_sample_test(ctx: MetricContext) -> MetricResult:
    """AUROC of a small CNN telling held-out synthetic films from real ones (0.5 = indistinguishable)."""
    result = two_sample_test(ctx.real, ctx.fake, ctx.real_patients, bootstrap=ctx.options.bootstrap, seed=ctx.seed)
    return MetricResult(result.values(), {}, result)


@register_metric("reidentification", needs=("train", "train_patients", "real_patients", "verifier_images"))
def reidentification(ctx: MetricContext) -> MetricResult:
    """Share of synthetic films a patient verifier matches to a training patient, beside the share of held-out
    real films it does (reidentification.py)."""
    assert ctx.train is not None and ctx.train_patients is not None and ctx.real_patients is not None
    o = ctx.options
    result = reidentification_audit(ctx.fake, ctx.train, ctx.train_patients, ctx.real, ctx.real_patients,
                                     ctx.verifier_images, ctx.verifier_patients, o.verifier, o.reid_false_match_rate,
                                     o.reid_worst, ctx.seed)
    return MetricResult(result.values(fpr_tag(o.reid_false_match_rate)), result.protocol(), result)


@register_metric("ppl", needs=("generator",), default=False)
def perceptual_path_length(ctx: MetricContext) -> MetricResult:
    """PPL with LPIPS-VGG distances (downloads the LPIPS weights once)."""
    return _path_length(ctx, ppl.lpips_distance(load_lpips(device=ctx.device)), "lpips")


@register_metric("ppl_randomfeat", needs=("generator",))
def random_feature_path_length(ctx: MetricContext) -> MetricResult:
    """Path length as PPL with the seeded random network's feature distance instead of LPIPS."""
    return _path_length(ctx, ppl.random_feature_distance(RandomExtractor(ctx.device).net), "randomfeat")


def _path_length(ctx: MetricContext, distance: ppl.Distance, network: str) -> MetricResult:
    assert ctx.generator is not None
    n = ctx.options.ppl_samples
    value, _ = ppl.perceptual_path_length(ctx.generator, distance, n, ctx.options.batch_size, ctx.seed, ctx.device)
    return MetricResult({f"ppl_{ppl.path_kind(ctx.generator)}{protocol_tag(n, ctx.resolution, network)}": value})
