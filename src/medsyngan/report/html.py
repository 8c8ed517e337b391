"""The self-contained evaluation report: one HTML file, every image inlined as base64 PNG, no scripts."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from medsyngan.metrics.definitions import definition
from medsyngan.metrics.evaluate import Evaluation
from medsyngan.metrics.privacy_audit import dp_tpr_bound
from medsyngan.privacy.accounting import format_epsilon
from medsyngan.report import plots
from medsyngan.report.plots import img_tag
from medsyngan.rundir import atomic_write_text

NON_CURVE_KEYS = {"time", "step", "kimg", "round", "hospital", "stage", "phase"}
MAX_CURVES = 12
NN_PANEL = 10

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em} td,th{border:1px solid #ddd;padding:.3em .6em;vertical-align:top}
th{background:#f4f4f4;text-align:left} td.num{text-align:right;font-family:ui-monospace,monospace;white-space:nowrap}
img{max-width:100%;image-rendering:pixelated} .note{color:#555;font-size:.9em} .flag{color:#b00;font-weight:bold}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.5em 1em}
"""


def _fmt(value: float) -> str:
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return str(value)
    if float(value).is_integer() and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}"


def _metric_table(metrics: dict[str, float]) -> str:
    rows = "".join(
        f"<tr><td><code>{html.escape(k)}</code></td><td class='num'>{_fmt(v)}</td><td>{html.escape(definition(k))}</td></tr>"
        for k, v in metrics.items()
    )
    return f"<table id='metrics'><tr><th>metric (protocol)</th><th>value</th><th>definition</th></tr>{rows}</table>"


def _comparison_table(comparison: dict[str, dict[str, float]]) -> str:
    """Several runs side by side (the demo: federated + DP against its centralized, non-private twin)."""
    names = list(comparison)
    keys = [k for k in dict.fromkeys(k for m in comparison.values() for k in m)]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(
        f"<tr><td><code>{html.escape(k)}</code></td>"
        + "".join(f"<td class='num'>{_fmt(comparison[n][k]) if k in comparison[n] else '—'}</td>" for n in names)
        + "</tr>"
        for k in keys
    )
    return f"<table id='comparison'><tr><th>metric</th>{head}</tr>{rows}</table>"


def _protocol(ev: Evaluation) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v) if not isinstance(v, str) else v)}</td></tr>"
        for k, v in ev.protocol.items()
    )
    return f"<table id='protocol'>{rows}</table>"


def _nn_section(ev: Evaluation, fake_u8: np.ndarray, train_u8: np.ndarray | None) -> str:
    nn = ev.nn
    if nn is None or train_u8 is None:
        return ""
    order = np.argsort(-nn.ssim)[:NN_PANEL]
    flagged = int((nn.ssim > ev.nn_threshold).sum())
    panel = plots.nn_panel_png(fake_u8, train_u8, order, nn.ssim_index, nn.ssim, ev.nn_threshold)
    rows = "".join(
        f"<tr><td>{i}</td><td>{nn.ssim_index[i]}</td><td class='num'>{nn.ssim[i]:.4f}</td>"
        f"<td class='num'>{nn.psnr[i]:.2f}</td><td>{'<span class=flag>near-copy</span>' if nn.ssim[i] > ev.nn_threshold else ''}</td></tr>"
        for i in order
    )
    return (
        "<h2>Nearest training images</h2>"
        f"<p>For each synthetic image, the training image of highest SSIM. {flagged} of {len(nn.ssim)} synthetic "
        f"images exceed the near-copy threshold SSIM &gt; {ev.nn_threshold:g} (set with <code>--nn-threshold</code>); "
        "red frames mark them. Inspect flagged pairs before releasing a synthetic set.</p>"
        + img_tag(panel, "synthetic images closest to a training image")
        + "<table id='nearest'><tr><th>synthetic #</th><th>nearest train #</th><th>SSIM</th><th>PSNR to NN by MSE (dB)</th><th></th></tr>"
        + rows + "</table>"
    )


def _privacy_section(ev: Evaluation) -> str:
    if not ev.dcr and not ev.attacks:
        return ""
    parts = ["<h2>Privacy audit</h2>"]
    for space, d in ev.dcr.items():
        parts.append(f"<h3>Distance to the closest training image ({html.escape(space)})</h3>")
        parts.append(f"<p>ratio of medians synthetic/holdout: <b>{d.ratio:.3f}</b> (below 1: closer to training "
                     "images than unseen real images are).</p>")
        parts.append(img_tag(plots.dcr_png(d.synthetic_to_train, d.holdout_to_train, space), f"DCR histogram {space}"))
    if ev.attacks:
        parts.append("<h3>Membership inference</h3><p>Members: training images; non-members: the holdout (--real). "
                     "The dashed line is the largest TPR any attack can reach against the run's (ε, δ)-DP guarantee, "
                     "for its privacy unit.</p>")
        parts.append(img_tag(plots.roc_png(ev.attacks, ev.epsilon, ev.delta, dp_tpr_bound), "membership inference ROC"))
    return "".join(parts)


def _run_section(run_rows: Sequence[dict[str, Any]] | None, snapshot_rows: Sequence[dict[str, Any]] | None) -> str:
    parts = []
    if snapshot_rows:
        keys = [k for k in snapshot_rows[0] if k not in NON_CURVE_KEYS and isinstance(snapshot_rows[0][k], (int, float))]
        png = plots.curves_png(snapshot_rows, keys, "metrics of saved snapshots")
        if png:
            parts.append("<h2>Snapshots</h2>" + img_tag(png, "metrics over snapshots"))
    if run_rows:
        numeric: list[str] = []
        for row in run_rows:
            for k, v in row.items():
                if k not in NON_CURVE_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool) and k not in numeric:
                    numeric.append(k)
        png = plots.curves_png(run_rows, numeric[:MAX_CURVES], "training log (metrics.jsonl)")
        if png:
            parts.append("<h2>Training curves</h2>" + img_tag(png, "training curves"))
        eps_rows = [r for r in run_rows if isinstance(r.get("epsilon"), (int, float))]
        png = plots.curves_png(eps_rows, ["epsilon"], "privacy spent", x_keys=("round", "kimg", "step")) if eps_rows else None
        if png:
            parts.append("<h2>ε per round</h2>" + img_tag(png, "epsilon per round"))
        parts.append(_hospital_epsilons(run_rows))
    return "".join(parts)


def _hospital_epsilons(run_rows: Sequence[dict[str, Any]]) -> str:
    """Each hospital's ε as its own ledger last reported it, with the relation (federated DP runs)."""
    latest = {h: stats for row in run_rows for h, stats in row.get("hospital", {}).items() if "epsilon" in stats}
    if not latest:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(h)}</td><td>{format_epsilon(s['epsilon'], '.4g')}</td>"
        f"<td>{format_epsilon(s.get('epsilon_add_remove', float('nan')), '.4g')}"
        f"</td><td>{s.get('delta', float('nan')):.3g}</td><td>{html.escape(str(s.get('relation', '')))} "
        f"{'patient' if s.get('patient_level') else 'image'}</td></tr>" for h, s in sorted(latest.items(), key=lambda x: int(x[0])))
    return ("<h2>ε per hospital</h2><p>As each hospital's own ledger reported it in the last round it trained.</p>"
            "<table id='hospital-epsilon'><tr><th>hospital</th><th>ε</th><th>ε add/remove-one</th><th>δ</th>"
            f"<th>relation</th></tr>{rows}</table>")


def render_report(
    ev: Evaluation, fake_u8: np.ndarray, train_u8: np.ndarray | None = None, *,
    run_rows: Sequence[dict[str, Any]] | None = None, snapshot_rows: Sequence[dict[str, Any]] | None = None,
    title: str = "MedSynGAN evaluation", notes: Sequence[str] = (), grid: int = 64,
    comparison: dict[str, dict[str, float]] | None = None,
) -> str:
    from medsyngan.report.audit import audit_section  # it draws on this module's helpers

    skipped = "".join(f"<li><code>{html.escape(g)}</code>: {html.escape(r)}</li>" for g, r in ev.skipped.items())
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>",
        *(f"<p class='warn'>{html.escape(n)}</p>" for n in notes),
        "<h2>Synthetic samples</h2>",
        img_tag(plots.grid_png(np.asarray(fake_u8[:grid]), cols=8), "synthetic sample grid"),
        *(["<h2>Compared with other runs</h2>", _comparison_table(comparison)] if comparison else []),
        "<h2>Metrics</h2>",
        "<p>Each name carries its protocol: sample count (k = thousand), resolution in pixels, feature network, and k "
        "for k-NN metrics. Values are comparable only between identical protocols.</p>",
        _metric_table(ev.metrics),
        f"<div class='warn'><b>Not computed:</b><ul>{skipped}</ul></div>" if skipped else "",
        "<h2>Protocol</h2>",
        _protocol(ev),
        _nn_section(ev, fake_u8, train_u8),
        audit_section(ev, fake_u8, train_u8),
        _privacy_section(ev),
        _run_section(run_rows, snapshot_rows),
    ]
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(body) + "</body></html>"
    )


def write_report(path: str | Path, ev: Evaluation, fake_u8: np.ndarray, train_u8: np.ndarray | None = None, **kwargs) -> Path:
    """Render and atomically write ``report.html``; keyword arguments as :func:`render_report`."""
    path = Path(path)
    atomic_write_text(path, render_report(ev, fake_u8, train_u8, **kwargs))
    return path
