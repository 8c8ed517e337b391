"""The report's answer to "does the synthetic data help, and is it safe?": utility, detectability, re-identification.

One section built from the detail objects of the ``utility``, ``detectability`` and ``reidentification`` metrics
(:mod:`medsyngan.metrics.utility`, :mod:`~medsyngan.metrics.detectability`,
:mod:`~medsyngan.metrics.reidentification`); empty when none of them ran.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np

from medsyngan.metrics.auroc import Estimate
from medsyngan.metrics.evaluate import Evaluation
from medsyngan.report import plots
from medsyngan.report.plots import img_tag

KINDS = {"synth": "synthetic films only", "real": "real training films", "dp": "real training films, DP-SGD",
         "augment": "real + rare-finding synthetic films",
         "fidelity": "label fidelity: real-trained classifier on the synthetic films"}


def _cell(est: Estimate | None) -> str:
    if est is None:
        return "<td>—</td>"
    return f"<td class='num'>{est.value:.3f} [{est.lo:.3f}, {est.hi:.3f}]</td>"


def pairs_png(fake_u8: np.ndarray, train_u8: np.ndarray, pairs: Sequence[tuple[int, int]],
              captions: Sequence[str]) -> bytes:
    """Top row: synthetic films; bottom row: the training film each is paired with; a caption above each pair."""
    k = len(pairs)
    fig, axes = plots.plt.subplots(2, k, figsize=(1.5 * k, 3.4), squeeze=False)
    for col, ((i, j), caption) in enumerate(zip(pairs, captions)):
        for row, img in enumerate((fake_u8[i], train_u8[j])):
            axes[row][col].imshow(img, cmap="gray", vmin=0, vmax=255)
            axes[row][col].set_xticks([])
            axes[row][col].set_yticks([])
        axes[0][col].set_title(caption, fontsize=8)
    axes[0][0].set_ylabel("synthetic", fontsize=9)
    axes[1][0].set_ylabel("training", fontsize=9)
    return plots._png(fig)


def _utility(ev: Evaluation) -> str:
    result = ev.details.get("utility")
    if result is None:
        return ""
    kinds = [k for k in KINDS if k in result.scores]
    head = "".join(f"<th>{html.escape(KINDS[k])} ({result.scores[k].films} films)</th>" for k in kinds)
    rows = []
    for label in result.labels:
        cells = "".join(_cell(result.scores[k].per_label.get(label)) for k in kinds)
        rare = " (rare)" if label in result.rare else ""
        rows.append(f"<tr><td><code>{html.escape(label)}</code>{rare}</td>{cells}</tr>")
    means = "".join(_cell(Estimate.of(*result.scores[k].mean(result.rare if k == "augment" else None)))
                    for k in kinds)
    rows.append(f"<tr><th>mean (augment: rare findings)</th>{means}</tr>")
    dp = ""
    if result.dp is not None:
        d = result.dp
        dp = (f" The DP-SGD classifier trained on the same real films at ε = {d.epsilon:.3g} (δ = {d.delta:.2g}, "
              f"patient-level, {d.patients} patients): what a hospital could release instead of synthetic films.")
    skipped = "".join(f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>" for k, v in result.skipped.items())
    return ("<h3>Utility: train on synthetic, test on real</h3>"
            "<p>AUROC on the real evaluation patients, with 95 % intervals that resample patients, of the same small "
            f"classifier trained on each set.{dp} Label fidelity applies the real-trained classifier to the synthetic "
            "films instead, against the labels each was generated from (its intervals resample films): below 0.5 "
            "the generator draws that label the wrong way round.</p>"
            f"<table id='utility'><tr><th>label</th>{head}</tr>{''.join(rows)}</table>"
            + (f"<details><summary>labels not scored</summary><ul>{skipped}</ul></details>" if skipped else ""))


def _detectability(ev: Evaluation) -> str:
    result = ev.details.get("detectability")
    if result is None:
        return ""
    a = result.auroc
    return ("<h3>Detectability</h3>"
            f"<p>A small CNN told held-out synthetic films from real ones with AUROC <b>{a.value:.3f}</b> "
            f"[{a.lo:.3f}, {a.hi:.3f}] ({result.films} films of each; 0.5 = indistinguishable, 1 = always told "
            "apart).</p>")


def _reidentification(ev: Evaluation, fake_u8: np.ndarray, train_u8: np.ndarray | None) -> str:
    result = ev.details.get("reidentification")
    if result is None:
        return ""
    flag = " class='flag'" if result.synthetic_rate > result.holdout_rate else ""
    text = ("<h3>Re-identification</h3>"
            f"<p>A patient verifier (AUC {result.verifier_auc:.3f} on same- against different-patient pairs) "
            f"matches <b{flag}>{result.synthetic_rate:.1%}</b> of synthetic films to a training patient at a "
            f"false-match rate of {result.false_match_rate:g}, against {result.holdout_rate:.1%} of real films of "
            "patients it never saw: synthetic films should not verify more often than strangers do. The worst "
            "cases, each with the training film it matched:</p>")
    if train_u8 is None or not result.worst:
        return text
    pairs = [(m.synthetic, m.train) for m in result.worst]
    captions = [f"#{m.synthetic}\n{m.score:.3f}" for m in result.worst]
    return text + img_tag(pairs_png(fake_u8, train_u8, pairs, captions), "worst re-identification cases")


def audit_section(ev: Evaluation, fake_u8: np.ndarray, train_u8: np.ndarray | None) -> str:
    """The HTML section (empty when neither utility, detectability nor re-identification was computed)."""
    parts = [_utility(ev), _detectability(ev), _reidentification(ev, fake_u8, train_u8)]
    if not any(parts):
        return ""
    return "<h2>Does the synthetic data help?</h2>" + "".join(parts)
