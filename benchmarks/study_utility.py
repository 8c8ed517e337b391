"""Tables and the plot of a study scored with utility (``utility = true`` in its study.toml): per row, the mean
AUROC on the real evaluation patients of the classifier trained on the synthetic films, on the real training films
and on those with DP-SGD at the row's ε, the label fidelity of the synthetic films, detectability and
re-identification; and, for a ``[sweep]``, FD,
detectability and utility against ε (``docs/results/<figure>``)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from medsyngan.privacy.accounting import format_epsilon

# (heading, metric prefix, suffix): the figures of one run; intervals sit beside them as <key>_lo / <key>_hi
FIGURES = [
    ("synthetic-only AUROC", "auroc_synth", "_mean"), ("real-trained AUROC", "auroc_real", "_mean"),
    ("DP-SGD AUROC", "auroc_dp", "_mean"), ("synth − DP-SGD", "auroc_gap_dp", "_mean"),
    ("label fidelity", "auroc_fidelity", "_mean"),
    ("detectability AUROC", "c2st_auroc", ""), ("re-identified, synthetic", "reid_synth_rate", ""),
    ("re-identified, real strangers", "reid_holdout_rate", ""), ("FD (rand)", "fd", ""),
]


def figure(metrics: dict[str, float], prefix: str, suffix: str) -> tuple[float | None, float | None, float | None]:
    """(value, lo, hi) of the one metric ``prefix…suffix`` (lo/hi None when it has no interval)."""
    for key, value in metrics.items():
        if key.startswith(prefix) and key.endswith(suffix) and not key.endswith(("_lo", "_hi", "_std")) \
                and "rare" not in key:
            return value, metrics.get(f"{key}_lo"), metrics.get(f"{key}_hi")
    return None, None, None


def _cell(value: float | None, lo: float | None, hi: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else f"{value:.3f}"


def utility_markdown(results: list[dict[str, Any]], rows: list[str]) -> str:
    """One line per row (first seed): the figures of :data:`FIGURES` with their 95 % patient-bootstrap intervals."""
    head = ["configuration", "ε", *[h for h, _, _ in FIGURES]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in rows:
        run = next((r for r in results if r["config"] == name), None)
        if run is None:
            continue
        eps = run.get("epsilon")
        cells = [_cell(*figure(run["metrics"], p, s)) for _, p, s in FIGURES]
        shown = "—" if eps is None else format_epsilon(eps, ".3g")
        lines.append(f"| {run['label']} | {shown} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_label_markdown(run: dict[str, Any]) -> str:
    """Per-label AUROC of the three classifiers of one run and the run's label fidelity, with intervals."""
    metrics = run["metrics"]
    kinds = [("synthetic only", "synth"), ("real", "real"), ("DP-SGD", "dp"), ("label fidelity", "fidelity")]

    def key(kind: str, label: str) -> str | None:
        pattern = re.compile(rf"^auroc_{kind}\d+k?_\d+(_eps[^_]+)?_{re.escape(label)}$")
        return next((k for k in metrics if pattern.match(k)), None)

    labels = [m.group(1) for k in metrics if (m := re.match(r"^auroc_synth\d+k?_\d+_(.+)$", k))
              and not k.endswith(("_lo", "_hi", "mean"))]
    lines = ["| label | " + " | ".join(name for name, _ in kinds) + " |", "|---|" + "---|" * len(kinds)]
    for label in labels:
        cells = []
        for _, kind in kinds:
            k = key(kind, label)
            cells.append("—" if k is None else _cell(metrics[k], metrics.get(f"{k}_lo"), metrics.get(f"{k}_hi")))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_png(results: list[dict[str, Any]], rows: list[str], epsilons: list[float], path: Path,
              title: str) -> Path:
    """FD, detectability AUROC and utility (synthetic-only beside DP-SGD and real-trained classifiers) against ε,
    with the 95 % patient-bootstrap intervals as error bars; ε = ∞ is drawn at the right end of a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [e for e in epsilons if math.isfinite(e)]
    inf_x = max(finite) * 3 if finite else 1.0
    by_row = {r["config"]: r for r in results if r["config"] in rows}
    xs = [e if math.isfinite(e) else inf_x for e, row in zip(epsilons, rows) if row in by_row]
    runs = [by_row[row] for row in rows if row in by_row]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("FD (random features)", [("fd", "", "generator", "C0")]),
              ("detectability AUROC (0.5 = indistinguishable)", [("c2st_auroc", "", "real vs synthetic", "C3")]),
              ("mean AUROC on real evaluation patients", [("auroc_synth", "_mean", "synthetic only", "C0"),
                                                          ("auroc_dp", "_mean", "DP-SGD classifier, same ε", "C1"),
                                                          ("auroc_real", "_mean", "real-trained (no privacy)", "C2")])]
    for ax, (ylabel, series) in zip(axes, panels):
        for prefix, suffix, name, colour in series:
            points = [(x, *figure(r["metrics"], prefix, suffix)) for x, r in zip(xs, runs)]
            points = [p for p in points if p[1] is not None]
            if not points:
                continue
            x, v, lo, hi = (np.array([p[i] if p[i] is not None else np.nan for p in points], float) for i in range(4))
            spread = np.nan_to_num(np.stack([v - lo, hi - v]))
            ax.errorbar(x, v, yerr=spread, fmt="o-", color=colour, capsize=3, label=name)
        ax.set_xscale("log")
        ax.set_xticks([*finite, inf_x], [f"{e:g}" for e in finite] + ["∞"])
        ax.minorticks_off()
        ax.set_xlabel("ε (replace-one, per hospital)")
        ax.set_ylabel(ylabel)
        if len(series) > 1 or ylabel.startswith("detect"):
            ax.legend(fontsize=8)
    axes[1].axhline(0.5, color="grey", lw=0.8, ls="--")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
