"""Train-synthetic-test-real utility: the patient bootstrap, the classifier, its DP variant, the audit on a toy
problem whose labels are visible in the films."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from medsyngan.errors import UserError
from medsyngan.metrics import auroc as A
from medsyngan.metrics import privacy_audit
from medsyngan.metrics.classifier import (ClassifierSettings, cache_key, cached_network, masked_bce, predict,
                                          train_classifier)
from medsyngan.metrics.private_classifier import RELATION, train_private_classifier
from medsyngan.metrics.utility import UtilitySettings, binary_targets, scorable, utility_audit

TINY = ClassifierSettings(width=8, epochs=6, batch_size=16, min_steps=40)
TINY_DP = ClassifierSettings(width=8, epochs=6, batch_size=8, min_steps=60)  # q = 0.2: quick to account
SIZE = 32


def toy_films(labels: np.ndarray, seed: int) -> np.ndarray:
    """32-px noise films; label column 0 draws a bright square top left, column 1 a bar on the right."""
    rng = np.random.default_rng(seed)
    films = rng.normal(100, 25, (len(labels), SIZE, SIZE))
    films[labels[:, 0] == 1, 4:12, 4:12] += 90
    films[labels[:, 1] == 1, 6:26, 22:26] += 90
    return films.clip(0, 255).astype(np.uint8)


def toy_set(patients: int, films_per_patient: int, seed: int, bar: float = 0.5
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Films, labels and patient ids; half the patients have the square, the share ``bar`` the bar."""
    rng = np.random.default_rng(seed)
    square = rng.permutation(patients) < patients // 2
    per_patient = np.stack([square, rng.permutation(patients) < round(bar * patients)], axis=1).astype(float)
    labels = np.repeat(per_patient, films_per_patient, axis=0)
    ids = np.repeat([f"s{seed}p{i}" for i in range(patients)], films_per_patient)
    return toy_films(labels, seed), labels, ids


# ------------------------------------------------------------------------------------------- patient bootstrap
def test_weighted_auroc_is_mann_whitney_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)
    labels = (rng.random(60) < 0.4).astype(float)
    fpr, tpr = privacy_audit.roc_curve(scores[labels == 1], scores[labels == 0])
    assert A.auroc(scores, labels) == pytest.approx(privacy_audit.auc(fpr, tpr))
    # a weight of 2 is the film counted twice
    w = rng.integers(0, 3, 60)
    repeated = np.repeat(np.arange(60), w)
    assert A.weighted_auroc(scores, labels, w[None].astype(float))[0] == pytest.approx(
        A.auroc(scores[repeated], labels[repeated]))


def test_bootstrap_resamples_patients_not_films():
    patients = np.repeat([f"p{i}" for i in range(12)], 5)
    w = A.bootstrap_weights(patients, 200, seed=0)
    per_patient = w.reshape(200, 12, 5)
    assert (per_patient == per_patient[:, :, :1]).all()  # a patient's films are drawn together
    assert (per_patient[:, :, 0].sum(axis=1) == 12).all()  # as many patients as there are
    strata = np.r_[np.zeros(20), np.ones(40)]
    ws = A.bootstrap_weights(patients, 200, seed=0, strata=strata)
    assert (ws[:, :20].sum(1) == 20).all() and (ws[:, 20:].sum(1) == 40).all()


def test_a_patient_interval_is_wider_than_a_film_interval_when_films_repeat():
    rng = np.random.default_rng(1)
    scores, labels = rng.normal(size=16), np.r_[np.ones(8), np.zeros(8)]
    scores[labels == 1] += 1.0
    films = np.repeat(np.arange(16), 6)  # six follow-up films per patient, all alike
    by_patient = A.interval(A.weighted_auroc(scores[films], labels[films], A.bootstrap_weights(films, 2000, 0)))
    by_film = A.interval(A.weighted_auroc(scores[films], labels[films],
                                          A.bootstrap_weights(np.arange(len(films)), 2000, 0)))
    assert by_patient[1] - by_patient[0] > 1.8 * (by_film[1] - by_film[0])


# ----------------------------------------------------------------------------------------------- classifier
def test_the_classifier_is_a_function_of_data_settings_and_seed():
    films, labels, _ = toy_set(20, 2, seed=0)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = train_classifier(films, labels, TINY, seed=5)
    assert torch.rand(1) == before  # the caller's RNG untouched
    b = train_classifier(films, labels, TINY, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = train_classifier(films, labels, TINY, seed=6)
    assert not torch.equal(a.head.weight, c.head.weight)


@pytest.mark.parametrize("train", ["train_classifier", "train_verifier"])
def test_a_network_does_not_depend_on_the_callers_thread_count(train):
    from medsyngan.metrics import classifier, reidentification

    rng = np.random.default_rng(0)
    films = rng.integers(0, 256, size=(96, 64, 64), dtype=np.uint8)
    if train == "train_classifier":
        fit = functools.partial(classifier.train_classifier, films, rng.integers(0, 2, (96, 3)).astype(float),
                                ClassifierSettings(width=16, epochs=2, batch_size=32), 0)
    else:
        fit = functools.partial(reidentification.train_verifier, films, np.repeat(np.arange(48), 2),
                                reidentification.VerifierSettings(steps=8, patients=16), 0)
    before = torch.get_num_threads()
    weights = []
    for threads in (1, 3):
        torch.set_num_threads(threads)
        weights.append(fit().state_dict())
        assert torch.get_num_threads() == threads  # the caller's count is restored
    torch.set_num_threads(before)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_training_thread_count_is_part_of_the_cache_key_and_checked(monkeypatch):
    from medsyngan.metrics.classifier import THREADS_ENV

    settings = ClassifierSettings()
    monkeypatch.setenv(THREADS_ENV, "1")
    one = cache_key("utility-real", settings, 0)
    monkeypatch.setenv(THREADS_ENV, "2")
    assert cache_key("utility-real", settings, 0) != one
    monkeypatch.setenv(THREADS_ENV, "two")
    with pytest.raises(UserError, match="is not a thread count"):
        cache_key("utility-real", settings, 0)


def test_an_unknown_target_contributes_no_loss_and_no_gradient():
    logits = torch.tensor([[0.3, -1.2], [2.0, 0.5]], requires_grad=True)
    targets = torch.tensor([[float("nan"), 1.0], [0.0, float("nan")]])
    loss = masked_bce(logits, targets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits.detach()[[0, 1], [1, 0]],
                                                                    torch.tensor([1.0, 0.0]), reduction="none")
    assert torch.allclose(loss, expected)
    loss.sum().backward()
    assert logits.grad[0, 0] == 0 and logits.grad[1, 1] == 0 and (logits.grad[[0, 1], [1, 0]] != 0).all()


def test_a_cached_network_is_trained_once(medsyngan_cache):
    films, labels, _ = toy_set(10, 2, seed=3)
    key = cache_key("test", TINY, 0, films, labels)
    assert key != cache_key("test", TINY, 1, films, labels) != cache_key("test", TINY, 0, films, labels[::-1].copy())
    calls = []

    def train():
        calls.append(1)
        return train_classifier(films, labels, TINY, 0), {"threshold": 0.5}

    build = lambda: train_classifier(films[:1], labels[:1], ClassifierSettings(width=8, min_steps=0, epochs=0), 0)
    first, meta = cached_network(key, build, train)
    again, meta_again = cached_network(key, build, lambda: pytest.fail("trained twice"))
    assert calls == [1] and meta == meta_again == {"threshold": 0.5}
    np.testing.assert_array_equal(predict(first, films), predict(again, films))
    for torn in (b"", b"not a checkpoint", (medsyngan_cache / "classifiers" / f"{key}.pt").read_bytes()[:100]):
        (medsyngan_cache / "classifiers" / f"{key}.pt").write_bytes(torn)
        cached_network(key, build, train)  # a torn entry is trained again
    assert calls == [1, 1, 1, 1]


def test_the_dp_classifier_learns_within_its_epsilon():
    films, labels, patients = toy_set(40, 2, seed=4)
    net, info = train_private_classifier(films, labels, patients, TINY_DP, epsilon=16.0, seed=0)
    assert 15.0 < info.epsilon <= 16.0 and info.relation == RELATION
    assert info.patients == 40 and info.sample_rate == pytest.approx(8 / 40) and info.delta <= 1e-5
    held_out, truth, _ = toy_set(30, 2, seed=5)
    p = predict(net, held_out)
    assert min(A.auroc(p[:, c], truth[:, c]) for c in range(2)) > 0.85
    again, _ = train_private_classifier(films, labels, patients, TINY_DP, epsilon=16.0, seed=0)
    assert torch.equal(net.head.weight, again.head.weight)
    with pytest.raises(UserError, match="patient id per training film"):
        train_private_classifier(films, labels, patients[:3], TINY_DP, epsilon=16.0, seed=0)


# --------------------------------------------------------------------------------------------------- labels
def test_binary_targets_encode_view_sex_and_findings():
    names, y = binary_targets([("Effusion",), (), ("Mass", "Effusion")], ["PA", "AP", "LL"], ["M", "F", ""],
                              finding_names=("Effusion", "Pleural_Thickening"))
    assert names == ("view_pa", "sex_male", "any_finding", "effusion", "pleural_thickening")
    np.testing.assert_array_equal(y, [[1, 1, 1, 1, 0], [0, 0, 0, 0, 0], [np.nan, np.nan, 1, 1, 0]])
    names, _ = binary_targets([()], finding_names=())
    assert names == ("any_finding",)


def test_a_label_is_scored_with_enough_positive_and_negative_patients():
    labels = np.array([[1, 1], [1, 0], [0, 0], [0, 0], [1, np.nan]], float)
    patients = np.array(["a", "a", "b", "c", "d"])
    cols, skipped = scorable(labels, patients, ["x", "y"], minimum=2)
    assert cols == [0] and "1 positive / 3 negative" in skipped["y"]


# ---------------------------------------------------------------------------------------------------- audit
@pytest.fixture(scope="module")
def toy_sets():
    real = toy_set(60, 2, seed=10)
    train = toy_set(40, 2, seed=11, bar=0.05)
    fake = toy_set(48, 2, seed=12)
    return real, train, fake


def test_tstr_scores_informative_synthetic_labels_high_and_shuffled_ones_at_chance(toy_sets, medsyngan_cache):
    (real, real_y, real_p), (train, train_y, train_p), (fake, fake_y, _) = toy_sets
    settings = UtilitySettings(classifier=TINY, dp_classifier=TINY, bootstrap=300, min_patients=5, epsilon=4.0)
    result = utility_audit(fake, fake_y, real, real_y, real_p, ("square", "bar"), train, train_y, train_p, settings)
    values = result.values()
    assert result.labels == ["square", "bar"] and result.rare == ["bar"]
    assert values["auroc_synth96_32_square"] > 0.95 and values["auroc_synth96_32_mean"] > 0.95
    assert values["auroc_real80_32_square"] > 0.95
    lo, hi = values["auroc_synth96_32_square_lo"], values["auroc_synth96_32_square_hi"]
    assert lo <= values["auroc_synth96_32_square"] <= hi
    assert abs(values["auroc_gap_real_synth96_32_mean"]) < 0.1
    assert "auroc_dp80_32_eps4_mean" in values and result.dp is not None and result.dp.epsilon <= 4.0
    # the real training films carry the bar on few patients; synthetic bar films are added for it
    assert result.augment_films == int(fake_y[:, 1].sum()) and set(result.scores["augment"].per_label) == {"bar"}
    assert values["auroc_augment80_32_bar"] > 0.9
    assert {"auroc_real80_32_rare_mean", "auroc_augment80_32_rare_mean",
            "auroc_gap_real_augment80_32_rare_mean"} <= set(values)

    shuffled = fake_y[np.random.default_rng(0).permutation(len(fake_y))]
    chance = utility_audit(fake, shuffled, real, real_y, real_p, ("square", "bar"), settings=settings)
    assert set(chance.scores) == {"synth"}
    assert 0.3 < chance.values()["auroc_synth96_32_mean"] < 0.7


def test_label_fidelity_reads_the_synthetic_films_with_the_real_trained_classifier(toy_sets, medsyngan_cache):
    (real, real_y, real_p), (train, train_y, train_p), (fake, fake_y, _) = toy_sets
    settings = UtilitySettings(classifier=TINY, bootstrap=300, min_patients=5)
    faithful = utility_audit(fake, fake_y, real, real_y, real_p, ("square", "bar"), train, train_y, settings=settings)
    values = faithful.values()
    assert values["auroc_fidelity96_32_square"] > 0.95
    assert values["auroc_fidelity96_32_square_lo"] <= values["auroc_fidelity96_32_square"]
    # a generator that draws the square the wrong way round: its films' labels say the opposite of what they show
    inverted = fake_y.copy()
    inverted[:, 0] = 1 - inverted[:, 0]
    wrong = utility_audit(fake, inverted, real, real_y, real_p, ("square", "bar"), train, train_y, settings=settings)
    assert wrong.values()["auroc_fidelity96_32_square"] < 0.05
    # a label no synthetic film carries, or every one does, cannot be read off the films
    constant = fake_y.copy()
    constant[:, 1] = 0
    partial = utility_audit(fake, constant, real, real_y, real_p, ("square", "bar"), train, train_y, settings=settings)
    assert set(partial.scores["fidelity"].per_label) == {"square"}


def test_too_few_evaluation_patients_is_one_line(toy_sets):
    (real, real_y, real_p), _, (fake, fake_y, _) = toy_sets
    with pytest.raises(UserError, match="no label has 80 positive"):
        utility_audit(fake, fake_y, real, real_y, real_p, ("square", "bar"), settings=UtilitySettings(min_patients=80))


def test_each_film_gradient_is_clipped_before_the_sum():
    from opacus import GradSampleModule

    from medsyngan.metrics.classifier import SmallCNN, to_input
    from medsyngan.metrics.private_classifier import clipped_gradient_sum

    films, labels, _ = toy_set(3, 2, seed=6)
    x, y = to_input(films), torch.from_numpy(labels).float()
    y[0, 1] = float("nan")
    torch.manual_seed(0)
    net = SmallCNN(2, 8)
    params = list(net.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        grads = torch.autograd.grad(masked_bce(net(x[i : i + 1]), y[i : i + 1]).sum(), params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        expected = [e + g * min(1.0, 0.05 / (norm.item() + 1e-6)) for e, g in zip(expected, grads)]
    got = clipped_gradient_sum(GradSampleModule(net, loss_reduction="sum"), params, x, y, clip=0.05)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    assert torch.sqrt(sum((g**2).sum() for g in got)) <= 0.05 * len(x) + 1e-6


def test_label_names_must_make_distinct_keys(toy_sets):
    (real, real_y, real_p), _, (fake, fake_y, _) = toy_sets
    for names, message in ((("Square", "square"), "repeat after lower-casing"), (("square", "mean"), "'mean'"),
                           (("square", "bar_lo"), "'bar_lo'")):
        with pytest.raises(UserError, match=message):
            utility_audit(fake, fake_y, real, real_y, real_p, names)


def test_balanced_accuracy_is_the_mean_recall_at_the_threshold():
    scores, labels = np.array([0.9, 0.8, 0.7, 0.4]), np.array([0, 0, 0, 1])
    assert A.balanced_accuracy(scores, labels) == 0.0
    assert A.balanced_accuracy(1 - scores, labels) == 1.0
    assert A.balanced_accuracy(scores, np.array([1, 0, 1, 0]), threshold=0.75) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both classes"):
        A.balanced_accuracy(scores, np.ones(4))
