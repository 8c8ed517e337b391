"""The NIH study's tables: per-row means over seeds, the targets, FD by seed and the tuning table."""

from __future__ import annotations

import math

from typing import Any

import numpy as np


def pick(metrics: dict[str, float], prefix: str, suffix: str = "") -> float | None:
    """The value of the one metric named ``prefix…suffix`` (protocol tags vary with sample counts)."""
    for key, value in metrics.items():
        if key.startswith(prefix) and key.endswith(suffix) and not key.endswith("_std"):
            return value
    return None


COLUMNS = [  # (heading, metric prefix, suffix)
    ("FD (rand)", "fd", ""), ("KID", "kid", ""), ("prec", "precision", ""), ("recall", "recall", ""),
    ("density", "density", ""), ("coverage", "coverage", ""), ("MS-SSIM div", "msssim_div_fake", ""),
    ("NN-SSIM", "ssim_nn_train", ""), ("NN-SSIM max", "ssim_nn_train_max", ""), ("NN-PSNR", "psnr_nn_train", ""),
    ("NN-MSE", "mse_nn_train", ""), ("near-copies", "near_copies", ""), ("MIA AUC", "mia_ganleaks_pixel_auc", ""),
]


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def summarize(results: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per row (in the order of ``labels``, row → label): every table column (mean, std over seeds) plus ε,
    bytes and wall time."""
    out: dict[str, dict[str, Any]] = {}
    for key, label in labels.items():
        runs = [r for r in results if r["config"] == key]
        if not runs:
            continue
        row: dict[str, Any] = {"label": label, "seeds": [r["seed"] for r in runs]}
        for heading, prefix, suffix in COLUMNS:
            row[heading] = mean_std([pick(r["metrics"], prefix, suffix) for r in runs])
        row["MS-SSIM real"] = mean_std([pick(r["metrics"], "msssim_div_real") for r in runs])
        row["ε"] = mean_std([r["epsilon"] for r in runs])
        row["MB sent"] = mean_std([r["bytes_sent"] / 1e6 if r["bytes_sent"] else None for r in runs])
        row["wall s"] = mean_std([r["wall_s"] for r in runs])
        if any("phantom_metrics" in r for r in runs):
            row["phantoms"] = {name: mean_std([pick(r.get("phantom_metrics", {}), name) for r in runs])
                               for name in ("fd", "kid")}
        out[key] = row
    return out


def targets(summary: dict[str, dict[str, Any]], study, runs: list[dict[str, Any]] | None = None,
            nn_threshold: float = 0.95) -> list[dict[str, Any]]:
    """The study's targets (``study``: its study.toml), each with the measured figure and whether it was met. An
    FD target is judged on the ratio of the mean FDs over seeds; with ``runs`` it also carries the ratio of the
    medians and the ratio within each seed, because one unlucky seed of a short GAN run can move a mean a long way."""
    def fd(key: str) -> float | None:
        return summary.get(key, {}).get("FD (rand)", (None, None))[0]

    def fds(key: str) -> dict[int, float]:
        return {r["seed"]: v for r in runs or [] if r["config"] == key and (v := pick(r["metrics"], "fd")) is not None}

    checks: list[dict[str, Any]] = []
    for target in study.targets:
        key, reference, limit = target.row, target.reference, target.fd_ratio
        value, ref = fd(key), fd(reference)
        if ref is None or value is None:
            continue
        ratio = value / ref
        check = {"target": f"FD {key} / {reference}" + (f" ≤ {limit}" if limit else " (measured only)"),
                 "value": round(ratio, 3), "met": None if limit is None else ratio <= limit}
        mine, theirs = fds(key), fds(reference)
        if mine and theirs:
            check["median_ratio"] = round(float(np.median(list(mine.values())) / np.median(list(theirs.values()))), 3)
            check["per_seed"] = {seed: round(v / theirs[seed], 3) for seed, v in sorted(mine.items()) if seed in theirs}
        checks.append(check)
    copies = [summary[k]["near-copies"][0] for k in summary if summary[k]["near-copies"][0] is not None]
    if copies:
        checks.append({"target": f"no near-copies (NN-SSIM > {nn_threshold:g}) in any run", "value": max(copies),
                       "met": max(copies) == 0})
    if study.mia_target is not None:
        for key in study.mia_target.rows:
            auc = summary.get(key, {}).get("MIA AUC", (None, None))[0]
            if auc is not None:
                checks.append({"target": f"MIA AUC {key} ≤ {study.mia_target.max_auc:g}", "value": round(auc, 3),
                               "met": auc <= study.mia_target.max_auc})
    return checks


def _cell(value: tuple[float | None, float | None]) -> str:
    mean, std = value
    if mean is None:
        return "—"
    if math.isinf(mean):
        return "∞"  # a clip-only row's ε
    text = f"{mean:.4g}" if abs(mean) >= 1e-3 or mean == 0 else f"{mean:.2e}"
    return text + (f" ± {std:.2g}" if std is not None else "")


def markdown(summary: dict[str, dict[str, Any]], checks: list[dict[str, Any]]) -> str:
    heads = ["configuration"] + [h for h, _, _ in COLUMNS] + ["ε", "MB sent", "wall s"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for row in summary.values():
        lines.append("| " + " | ".join([row["label"]] + [_cell(row[h]) for h in heads[1:]]) + " |")
    real = next((r["MS-SSIM real"] for r in summary.values() if r["MS-SSIM real"][0] is not None), (None, None))
    lines += ["", f"MS-SSIM diversity of the real evaluation set itself: {_cell(real)} (lower = more diverse)."]
    phantoms = next((r["phantoms"] for r in summary.values() if "phantoms" in r), None)
    if phantoms and phantoms["fd"][0] is not None:
        lines.append(f"The public model's phantom images themselves (no GAN) against the evaluation set: "
                     f"FD {_cell(phantoms['fd'])}, KID {_cell(phantoms['kid'])}.")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for c in checks:
        met = "measured" if c["met"] is None else ("yes" if c["met"] else "**no**")
        value = f"{c['value']}"
        if "median_ratio" in c:
            seeds = ", ".join(f"s{k} {v}" for k, v in c["per_seed"].items())
            value += f" (medians {c['median_ratio']}; per seed {seeds})"
        lines.append(f"| {c['target']} | {value} | {met} |")
    return "\n".join(lines) + "\n"


def fd_by_seed(results: list[dict[str, Any]], order: list[str]) -> str:
    """Every run's FD, a row per seed and a column per row of the study (in ``order``), with the median over seeds
    last: the spread between seeds of one recipe is as large as most differences between recipes."""
    keys = [k for k in order if any(r["config"] == k for r in results)]
    seeds = sorted({r["seed"] for r in results})
    fd = {(r["config"], r["seed"]): pick(r["metrics"], "fd") for r in results}
    lines = ["| seed | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for seed in seeds:
        cells = [f"{fd[k, seed]:.2f}" if fd.get((k, seed)) is not None else "—" for k in keys]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    medians = [np.median([v for (k2, _), v in fd.items() if k2 == k and v is not None]) for k in keys]
    lines.append("| median | " + " | ".join(f"{m:.2f}" for m in medians) + " |")
    return "\n".join(lines) + "\n"


def tuning_markdown(rows: list[dict[str, Any]]) -> str:
    """The tuning table; a study scored with utility adds the validation patients' synthetic-only AUROC (mean
    over the labels scorable there), the synthetic films' label fidelity and detectability AUROC."""
    extra = [("val synthetic-only AUROC", "auroc_synth", "_mean"), ("label fidelity", "auroc_fidelity", "_mean"),
             ("val detectability", "c2st_auroc", "")]
    extra = [c for c in extra if any(pick(r["metrics"], c[1], c[2]) is not None for r in rows)]
    lines = ["| variant | row | seed | val FD | val KID | precision | recall | coverage | "
             + "".join(f"{c[0]} | " for c in extra) + "ε | wall s |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(extra) + "---|---|"]
    columns = [(p, "") for p in ("fd", "kid", "precision", "recall", "coverage")] + [c[1:] for c in extra]
    for r in rows:
        cells = [_cell((pick(r["metrics"], p, s), None)) for p, s in columns]
        lines.append(f"| {r['variant']} | {r['config']} | {r['seed']} | " + " | ".join(cells)
                     + f" | {_cell((r['epsilon'], None))} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"
