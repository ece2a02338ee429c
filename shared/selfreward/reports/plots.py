"""Plots of evaluations, written as PNG with matplotlib's Agg canvas.

Figures are built with `matplotlib.figure.Figure` (not pyplot), so plotting needs no display,
keeps no global state and is safe in threads and workers. Each function takes plain data
(what report.json holds) and returns the PNG bytes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SCORE_BINS = np.arange(-0.25, 5.26, 0.5)  # bars centred on 0, 0.5, ..., 5
WTL_COLORS = {"win": "#2e7d32", "tie": "#9e9e9e", "loss": "#c62828"}


def _figure(width: float = 6.4, height: float = 3.6) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def score_histograms(
    scores_by_model: Mapping[str, Sequence[float | None]], title: str = "Judge scores"
) -> bytes:
    """One histogram series per model of 0-5 scores (bins of 0.5); None = unparseable, counted in the legend."""
    fig = _figure()
    ax = fig.add_subplot()
    series = list(scores_by_model.items())
    width = 0.45 / max(1, len(series))
    centers = (SCORE_BINS[:-1] + SCORE_BINS[1:]) / 2
    for i, (name, scores) in enumerate(series):
        parsed = np.asarray([s for s in scores if s is not None], dtype=float)
        failed = len(scores) - len(parsed)
        counts, _ = np.histogram(parsed, bins=SCORE_BINS)
        label = f"{name} (n={len(scores)}" + (f", {failed} unparseable)" if failed else ")")
        ax.bar(centers + (i - (len(series) - 1) / 2) * width, counts, width=width, label=label)
    ax.set_xticks(range(6))
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("score")
    ax.set_ylabel("responses")
    ax.set_title(title)
    if series:
        ax.legend(fontsize="small")
    return _png(fig)


def win_tie_loss_bars(results: Sequence[Mapping[str, Any]], title: str = "Head-to-head") -> bytes:
    """Grouped win/tie/loss bars with their bootstrap intervals, one group per comparison.

    Each result is a head-to-head JSON (keys a, b, win, tie, loss, intervals, confidence).
    """
    fig = _figure(max(4.8, 1.8 + 1.6 * len(results)), 3.8)
    ax = fig.add_subplot()
    x = np.arange(len(results))
    width = 0.26
    for j, stat in enumerate(("win", "tie", "loss")):
        values = np.array([r[stat] for r in results], dtype=float)
        lo = np.array([r["intervals"][stat][0] for r in results], dtype=float)
        hi = np.array([r["intervals"][stat][1] for r in results], dtype=float)
        yerr = np.vstack([np.clip(values - lo, 0, None), np.clip(hi - values, 0, None)])
        ax.bar(x + (j - 1) * width, values, width, yerr=yerr, capsize=3, label=stat, color=WTL_COLORS[stat])
    ax.set_xticks(x, [f"{r['a']}\nvs {r['b']}" for r in results], fontsize="small")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of prompts")
    conf = results[0].get("confidence", 0.95) if results else 0.95
    ax.set_title(f"{title} ({conf:.0%} bootstrap intervals)")
    ax.legend(fontsize="small", ncols=3, loc="upper right")
    return _png(fig)


def metric_trends(
    labels: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    title: str = "Metrics by model",
    lengths: Mapping[str, Sequence[float | None]] | None = None,
) -> bytes:
    """Lines of each metric across models M1, M2, ... (None = not measured: a gap); with `lengths`,
    a second panel of mean answer lengths in characters."""
    fig = _figure(height=6.0) if lengths else _figure()
    axes = fig.subplots(2, 1, sharex=True) if lengths else [fig.add_subplot()]
    ax = axes[0]
    x = np.arange(len(labels))
    for name, values in series.items():
        y = np.array([np.nan if v is None else v for v in values], dtype=float)
        ax.plot(x, y, marker="o", label=name)
    finite = [v for values in series.values() for v in values if v is not None]
    ax.set_ylim(-1.05 if any(v < 0 for v in finite) else -0.02, 1.05)
    ax.set_title(title)
    if series:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    if lengths:
        lx = axes[1]
        for name, values in lengths.items():
            y = np.array([np.nan if v is None else v for v in values], dtype=float)
            lx.plot(x, y, marker="s", label=name)
        lx.set_ylabel("mean characters")
        lx.legend(fontsize="small")
        lx.grid(alpha=0.3)
    axes[-1].set_xticks(x, list(labels))
    axes[-1].set_xlabel("model")
    return _png(fig)


def bench_accuracy_bars(data: Mapping[str, Any]) -> bytes:
    """Judge-benchmark accuracy (judge ties = half) of each judge with its bootstrap interval, overall
    and per subset (grouped), a dashed line at 50% (chance). `data` is report.json of `eval judge`."""
    judges = data["judges"]
    subsets = sorted({s for j in judges for s in j["metrics"]["subsets"]})
    groups = ["all", *subsets]
    fig = _figure(max(5.6, 1.6 + 0.9 * len(groups) * max(1, len(judges)) ** 0.5), 4.0)
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(judges))
    for i, j in enumerate(judges):
        rows = [j["metrics"], *(j["metrics"]["subsets"].get(s, {}) for s in subsets)]
        values = np.array([np.nan if r.get("accuracy") is None else r["accuracy"] for r in rows], dtype=float)
        ivs = [r.get("intervals", {}).get("accuracy") for r in rows]
        lo = np.array([np.nan if iv is None else iv[0] for iv in ivs], dtype=float)
        hi = np.array([np.nan if iv is None else iv[1] for iv in ivs], dtype=float)
        yerr = np.vstack([np.clip(values - lo, 0, None), np.clip(hi - values, 0, None)])
        yerr = np.nan_to_num(yerr)
        ax.bar(x + (i - (len(judges) - 1) / 2) * width, values, width, yerr=yerr, capsize=2, label=j["judge"])
    ax.axhline(0.5, color="#616161", linestyle="--", linewidth=1)
    ax.set_xticks(x, groups, fontsize="small", rotation=20 if len(groups) > 4 else 0)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy vs human labels")
    ax.set_title(f"{data['set']['name']}: judge accuracy (95% bootstrap intervals)")
    fig.legend(fontsize="x-small", loc="outside lower center", ncols=min(4, max(1, len(judges))))
    return _png(fig)


def bench_length_bars(data: Mapping[str, Any]) -> bytes:
    """Per judge: accuracy where the human preferred the longer / the shorter response, and the
    judge's rate of preferring the longer one (length bias)."""
    judges = data["judges"]
    stats = (
        ("accuracy_human_prefers_longer", "accuracy, human prefers longer"),
        ("accuracy_human_prefers_shorter", "accuracy, human prefers shorter"),
        ("judge_prefers_longer_rate", "judge prefers the longer"),
    )
    fig = _figure(max(5.6, 1.8 + 1.4 * len(judges)), 3.8)
    ax = fig.add_subplot()
    x = np.arange(len(judges))
    width = 0.26
    for k, (key, label) in enumerate(stats):
        values = np.array(
            [np.nan if (v := j["metrics"]["length"].get(key)) is None else v for j in judges], dtype=float
        )
        ax.bar(x + (k - 1) * width, values, width, label=label)
    ax.axhline(0.5, color="#616161", linestyle="--", linewidth=1)
    ax.set_xticks(x, [j["judge"] for j in judges], fontsize="small", rotation=15 if len(judges) > 3 else 0)
    ax.set_ylim(0, 1)
    ax.set_title(f"{data['set']['name']}: length bias")
    fig.legend(fontsize="x-small", loc="outside lower center", ncols=3)
    return _png(fig)


def training_curves(curves: Sequence[Mapping[str, Any]], title: str = "Training curves") -> bytes:
    """Loss (every model) and DPO reward margin and accuracy per logged step, one line per model
    (selfreward.dashboard.metrics.curves: {model, kind, points: [{step, loss, ...}]})."""
    panels = [
        ("loss", "training loss"),
        ("rewards/margins", "DPO reward margin"),
        ("rewards/accuracies", "DPO reward accuracy"),
    ]
    shown = [(k, label) for k, label in panels if any(k in p for c in curves for p in c["points"])]
    fig = _figure(4.2 * max(1, len(shown)), 3.2)
    axes = fig.subplots(1, max(1, len(shown)), squeeze=False)[0]
    for ax, (key, label) in zip(axes, shown, strict=False):
        for c in curves:
            pts = [(p["step"], p[key]) for p in c["points"] if key in p]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=f"{c['model']} ({c.get('kind') or '?'})")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return _png(fig)
