"""`selfreward report RUN`: one self-contained HTML page for a run.

Reads the run's artifact folder (RunLayout) and embeds everything (inline CSS, PNGs as
base64 data URIs), so the page can be mailed or archived alone:
- the run's config summary and the metric trends across evaluated models (M2, M3, ...);
- a table of every evaluation (head-to-head win/tie/loss with intervals, reward-model metrics);
- the models and their manifests;
- per iteration: every stage manifest's counts, a histogram of the iteration's candidate
  scores (judgments.jsonl), and the evaluation's metrics and plots (eval/iter-<t>/).
Missing pieces (an iteration still running, no evaluation yet) are shown as such.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from selfreward.errors import InputError
from selfreward.reports.markdown import (
    BENCH_HEADER,
    bench_row,
    contamination_line,
    evaluator_line,
    interval,
    num,
    pct,
)
from selfreward.reports.plots import metric_trends, score_histograms
from selfreward.reports.trends import eval_dir, iteration_reports, length_series, trend_series
from selfreward.storage import RunLayout, atomic_write_text, read_jsonl, read_manifest

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;line-height:1.4;padding:0 1rem}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.25rem .55rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee;margin:.4rem .4rem .4rem 0}
.muted{color:#777}.warn{color:#b71c1c}.grid{display:flex;flex-wrap:wrap;gap:.5rem}
code{background:#f6f6f6;padding:0 .2rem}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for c in row:
            cls = ' class="n"' if isinstance(c, int | float) and not isinstance(c, bool) else ""
            cells.append(f"<td{cls}>{_e(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _scalars(data: Mapping[str, Any], prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    """Flatten a manifest to (key path, shown value): scalars, list lengths, nested dicts 2 deep."""
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if depth < 2:
                out += _scalars(value, f"{path}.", depth + 1)
        elif isinstance(value, list):
            out.append((path, f"[{len(value)} items]"))
        elif isinstance(value, float):
            out.append((path, f"{value:.4g}"))
        elif isinstance(value, str) and len(value) > 80:
            out.append((path, value[:77] + "..."))
        else:
            out.append((path, value))
    return out


def _manifest_block(title: str, manifest: Mapping[str, Any]) -> str:
    rows = _scalars(manifest)
    return f"<h4>{_e(title)}</h4>" + _table(["field", "value"], rows)


def _iterations(layout: RunLayout) -> list[int]:
    ts = set()
    for base in (layout.run_dir, layout.eval_dir):
        if base.is_dir():
            for d in base.glob("iter-*"):
                suffix = d.name.removeprefix("iter-")
                if d.is_dir() and suffix.isdigit():
                    ts.add(int(suffix))
    return sorted(ts)


def _candidate_scores(layout: RunLayout, t: int) -> tuple[str, list[float | None]] | None:
    path = layout.stage_file(t, "judgments")
    if not path.is_file():
        return None
    scores: list[float | None] = []
    for lineno, rec in read_jsonl(path):
        score = rec.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, int | float)):
            raise InputError(f"{path}:{lineno}: field 'score' must be a number or null, got {score!r}")
        scores.append(None if score is None else float(score))
    model = f"m{t}"
    cand = layout.stage_file(t, "candidates")
    if cand.is_file():
        for _, rec in read_jsonl(cand):
            model = str(rec.get("model") or model)
            break
    return model, scores


def _summary_rows(reports: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    rows = []
    for r in reports:
        h = r.get("head2head") or {}
        f = r.get("head2head_fixed") or {}
        rm = r.get("reward_model") or {}
        iv = h.get("intervals") or {}
        jh = r.get("judge_health") or {}
        lengths = (jh.get("chosen_length"), jh.get("rejected_length"))
        rows.append(
            [
                r.get("iteration"),
                r.get("model"),
                r.get("baseline") or "-",
                f"{pct(h.get('win_rate'))} {interval(iv.get('win_rate'))}" if h else "-",
                f"{h['wins']}/{h['ties']}/{h['losses']}" if h else "-",
                f"{pct(f.get('win_rate'))} {interval((f.get('intervals') or {}).get('win_rate'))} vs {f.get('b')}"
                if f
                else "-",
                _e((r.get("evaluator") or {}).get("spec") or r.get("judge") or "-")
                + (" (self-evaluation)" if r.get("self_evaluation") else ""),
                pct(rm.get("pairwise_accuracy")) if rm else "-",
                pct(rm.get("exact_match")) if rm else "-",
                num(rm.get("spearman")) if rm else "-",
                pct(rm.get("parse_failure_rate")) if rm else "-",
                (pct(jh.get("top_share")) + (" (collapsed)" if jh.get("collapsed") else "")) if jh else "-",
                pct(jh.get("parse_failure_rate")) if jh else "-",
                " / ".join("-" if v is None else f"{v:.0f}" for v in lengths) if jh else "-",
            ]
        )
    return rows


def _eval_section(layout: RunLayout, t: int) -> str:
    d = eval_dir(layout, t)
    report = d / "report.json"
    if not report.is_file():
        return '<p class="muted">No evaluation yet.</p>'
    data = json.loads(report.read_text(encoding="utf-8"))
    parts = [f"<h3>Evaluation of {_e(data.get('model'))}</h3>"]
    parts.append(f"<p>{_e(evaluator_line(data))}</p>")
    if data.get("self_evaluation"):
        parts.append(f'<p class="warn"><strong>{_e(data["self_evaluation"])}</strong></p>')
    if data.get("contamination"):
        parts.append(f"<p>{_e(contamination_line(data['contamination']))}</p>")
    comparisons = [("the previous model", data.get("head2head"))]
    fixed = data.get("head2head_fixed")
    if fixed and fixed != data.get("head2head"):
        comparisons.append(("the fixed baseline", fixed))
    for label, h in comparisons:
        if not h:
            continue
        iv = h["intervals"]
        summary = (h.get("summary") or {}).get("text")
        if summary:
            parts.append(f"<p><strong>{_e(summary)}</strong></p>")
        parts.append(
            f"<p>Head-to-head against {label} <code>{_e(h['b'])}</code> on {h['n']} prompts "
            f"(<code>{_e(h.get('prompts'))}</code>), judge <code>{_e(h.get('judge'))}</code>; "
            f"{h['failures']} failed judgments excluded; {h.get('identical_answers', 0)} of the "
            f"{h['ties']} ties are identical answers.</p>"
        )
        parts.append(
            _table(
                ["outcome", "share", f"{h.get('confidence', 0.95):.0%} interval", "prompts"],
                [
                    ["win", pct(h["win"]), interval(iv["win"]), h["wins"]],
                    ["tie", pct(h["tie"]), interval(iv["tie"]), h["ties"]],
                    ["loss", pct(h["loss"]), interval(iv["loss"]), h["losses"]],
                    ["win rate", pct(h["win_rate"]), interval(iv["win_rate"]), ""],
                ],
            )
        )
    rm = data.get("reward_model")
    if rm:
        ex = rm["excluding_unparseable"]
        keys = [
            ("pairwise accuracy", "pairwise_accuracy", pct),
            ("pairwise accuracy (ties = half)", "pairwise_accuracy_ties_half", pct),
            ("5-best", "five_best", pct),
            ("exact match", "exact_match", pct),
            ("Spearman (per prompt)", "spearman", num),
            ("Kendall tau-b (per prompt)", "kendall_tau", num),
            ("Spearman (pooled)", "spearman_pooled", num),
            ("Kendall tau-b (pooled)", "kendall_tau_pooled", num),
        ]
        parts.append(
            f"<p>Reward modeling of <code>{_e(rm.get('judge'))}</code> against human ranks "
            f"({rm['prompts_compared']} prompts, parse failures {pct(rm['parse_failure_rate'])}).</p>"
        )
        parts.append(
            _table(
                ["metric", "all scores", "excluding unparseable"],
                [[label, f(rm.get(k)), f(ex.get(k))] for label, k, f in keys],
            )
        )
    for name, bench in (data.get("judge_bench") or {}).items():
        s = bench["set"]
        parts.append(
            f"<p>Judge benchmark <code>{_e(name)}</code> ({_e(s['format'])}, {s['sampled']} of {s['items']} "
            f"judgeable items; excluded: {_e(', '.join(f'{k} {v}' for k, v in s['excluded'].items()) or 'none')}): "
            "accuracy against the human labels, judge ties counted half, 95% bootstrap intervals.</p>"
        )
        rows = [[j.get("role", "-"), *bench_row(j, quote=False)] for j in bench["judges"]]
        parts.append(_table(["role", *BENCH_HEADER], rows))
    images = [_img((d / name).read_bytes(), name) for name in data.get("plots", []) if (d / name).is_file()]
    if images:
        parts.append('<div class="grid">' + "".join(images) + "</div>")
    return "".join(parts)


def build_run_report(layout: RunLayout, out_path: Path | None = None) -> Path:
    """Write the run's HTML page (default runs/<run>/report.html); returns its path."""
    if not layout.run_dir.is_dir():
        raise InputError(f"{layout.run_dir}: no such run (artifact root {layout.root})")
    parts = [f"<h1>Run {_e(layout.run)}</h1>", f'<p class="muted">{_e(layout.run_dir)}</p>']
    if layout.config_path.is_file():
        try:
            cfg = yaml.safe_load(layout.config_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"{layout.config_path}: not valid YAML ({exc})") from None
        fields = [
            ("variant", cfg.get("variant")),
            ("iterations", cfg.get("iterations")),
            ("base model", (cfg.get("model") or {}).get("base")),
            ("teacher", (cfg.get("teacher") or {}).get("backend")),
            ("eval judge", (cfg.get("eval") or {}).get("judge")),
            ("eval prompts", (cfg.get("eval") or {}).get("prompts")),
            ("seed", cfg.get("seed")),
        ]
        parts.append(_table(["setting", "value"], [[k, "-" if v is None else v] for k, v in fields]))

    reports = iteration_reports(layout)
    parts.append("<h2>Metrics by model</h2>")
    if reports:
        labels, series = trend_series(reports)
        if series:
            title = f"Run {layout.run}: metrics by model"
            parts.append(_img(metric_trends(labels, series, title, length_series(reports)), "trends"))
        parts.append(
            _table(
                [
                    "iteration",
                    "model",
                    "baseline",
                    "win rate [95% CI]",
                    "w/t/l",
                    "win rate vs fixed baseline",
                    "evaluator",
                    "RM pairwise acc.",
                    "RM exact match",
                    "RM Spearman",
                    "RM parse failures",
                    "judge top-score share",
                    "judge parse failures",
                    "chosen / rejected chars",
                ],
                _summary_rows(reports),
            )
        )
    else:
        parts.append('<p class="muted">No evaluation yet.</p>')

    parts.append("<h2>Models</h2>")
    models = (
        sorted(p for p in layout.models_dir.glob("*/manifest.json")) if layout.models_dir.is_dir() else []
    )
    if models:
        for path in models:
            manifest = read_manifest(path) or {}
            parts.append(_manifest_block(path.parent.name, manifest))
    else:
        parts.append('<p class="muted">No model written yet.</p>')

    for t in _iterations(layout):
        parts.append(f"<h2>Iteration {t}</h2>")
        manifests = sorted(layout.iter_dir(t).glob("*.manifest.json")) if layout.iter_dir(t).is_dir() else []
        if manifests:
            rows = []
            for path in manifests:
                stage = path.name.removesuffix(".manifest.json")
                manifest = read_manifest(path) or {}
                counts = ", ".join(
                    f"{k}={v}"
                    for k, v in _scalars(manifest)
                    if isinstance(v, int | float) and not isinstance(v, bool)
                )
                rows.append([stage, manifest.get("written_at", "-"), counts or "-"])
            parts.append(_table(["stage", "written at", "counts"], rows))
        else:
            parts.append('<p class="muted">No stage finished yet.</p>')
        cand = _candidate_scores(layout, t)
        if cand is not None:
            model, scores = cand
            unscored = sum(1 for s in scores if s is None)
            parts.append(
                f"<p>Candidate scores of <code>{_e(model)}</code> (judgments.jsonl): {len(scores)} candidates, "
                f"{unscored} without a score.</p>"
            )
            parts.append(
                _img(
                    score_histograms({f"{model} candidates": scores}, f"Iteration {t}: candidate scores"),
                    f"iteration {t} candidate scores",
                )
            )
        parts.append(_eval_section(layout, t))

    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>selfreward run {_e(layout.run)}</title><style>{CSS}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )
    out = out_path or layout.run_dir / "report.html"
    atomic_write_text(out, page)
    return out
