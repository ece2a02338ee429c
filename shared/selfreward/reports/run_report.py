"""`selfreward report RUN`: one self-contained HTML page for a run, for a person to read.

Reads the run's artifact folder (RunLayout) and embeds everything (inline CSS, PNGs as base64
data URIs), so the page can be mailed or archived alone. In reading order:
- the summary: per evaluated iteration, the dashboard's sentence ("M(t+1) vs M(t): win rate X%
  [interval], judge agreement Y% (change), length change", selfreward.dashboard.metrics) with a
  verdict only where the interval excludes 50%; warnings (judge collapse, self-evaluation);
- the metrics across iterations (a trend plot once two iterations are evaluated, the table);
- the training curves (loss, DPO reward margin and accuracy per step, from each model's
  log_history.jsonl);
- examples: a few chosen/rejected pairs per iteration and evaluation answers side by side;
- per iteration: its stages (time, main counts), the candidate score histogram, the evaluation;
- the raw manifests (models and stages), in a collapsed section.
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
.summary{font-size:1.05rem;margin:.35rem 0}.summary.evidence strong{color:#1a7f37}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:.6rem;margin:.3rem 0 1rem}
.pair div{padding:.45rem;border-radius:.3rem;white-space:pre-wrap;font-size:.9rem}
.chosen{background:#e8f5e9}.rejected{background:#ffebee}.side div{background:#f6f6f6}
.prompt{font-weight:600;white-space:pre-wrap;margin-top:.8rem}
details{margin:.6rem 0}summary{cursor:pointer;color:#0b57d0}
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


def _summary_section(layout: RunLayout, trends: list[dict[str, Any]], reports: list[dict[str, Any]]) -> str:
    parts = ["<h2>Summary</h2>"]
    if not trends:
        parts.append(
            '<p class="muted">No evaluation yet: the summary appears once an iteration is evaluated.</p>'
        )
    for row in trends:
        s = row["sentence"]
        cls = "summary evidence" if s["evidence"] else "summary"
        parts.append(f'<p class="{cls}">{_e(s["text"])} <strong>{_e(s["verdict"])}.</strong></p>')
    for r in reports:
        if (r.get("judge_health") or {}).get("collapsed"):
            parts.append(
                f'<p class="warn">Iteration {_e(r.get("iteration"))}: the judge collapsed (top-score share '
                f"{pct((r.get('judge_health') or {}).get('top_share'))}): its pairs carry little signal.</p>"
            )
        if r.get("self_evaluation"):
            parts.append(
                f'<p class="warn">Iteration {_e(r.get("iteration"))}: {_e(r["self_evaluation"])}</p>'
            )
    return "".join(parts)


def _examples_section(layout: RunLayout, iterations: list[int], per_iteration: int = 3) -> str:
    from selfreward.dashboard.browse import DataQuery, eval_page, prompt_page

    parts = []
    for t in iterations:
        if t < 1:
            continue
        block = []
        page = prompt_page(layout, t, DataQuery(limit=per_iteration))
        for item in page["items"]:
            pair = item["pair"] or {}
            block.append(f'<div class="prompt">{_e(item["prompt"])}</div>')
            block.append(
                '<div class="pair">'
                f'<div class="chosen"><strong>chosen ({num(pair.get("chosen_score"), 2)})</strong>\n'
                f"{_e(pair.get('chosen'))}</div>"
                f'<div class="rejected"><strong>rejected ({num(pair.get("rejected_score"), 2)})</strong>\n'
                f"{_e(pair.get('rejected'))}</div></div>"
            )
        evals = eval_page(layout, t, None, 0, per_iteration)
        for e in evals["items"]:
            pref = e.get("preference")
            outcome = (
                "failed"
                if pref is None
                else f"{e['a']} wins"
                if pref > 0.5
                else f"{e['b']} wins"
                if pref < 0.5
                else "tie"
            )
            block.append(
                f'<div class="prompt">{_e(e.get("instruction") or e["prompt_id"])} ({_e(outcome)})</div>'
            )
            block.append(
                '<div class="pair side">'
                f"<div><strong>A: {_e(e['a'])}</strong>\n{_e(e.get('answer_a'))}</div>"
                f"<div><strong>B: {_e(e['b'])}</strong>\n{_e(e.get('answer_b'))}</div></div>"
            )
        if block:
            parts.append(
                f"<h3>Iteration {t}: pairs the model trained on, and evaluation answers</h3>" + "".join(block)
            )
    if not parts:
        return ""
    return "<h2>Examples</h2>" + "".join(parts)


def _stage_rows(layout: RunLayout, t: int) -> list[list[Any]]:
    rows = []
    for path in sorted(layout.iter_dir(t).glob("*.manifest.json")):
        stage = path.name.removesuffix(".manifest.json")
        manifest = read_manifest(path) or {}
        counts = ", ".join(
            f"{k}={v}"
            for k, v in _scalars(manifest)
            if isinstance(v, int | float)
            and not isinstance(v, bool)
            and k not in ("iteration", "seed", "started_at", "seconds", "seconds_total")
        )
        seconds = manifest.get("seconds")
        rows.append([stage, "-" if seconds is None else f"{seconds:.1f} s", counts or "-"])
    return rows


def build_run_report(layout: RunLayout, out_path: Path | None = None) -> Path:
    """Write the run's HTML page (default runs/<run>/report.html); returns its path."""
    from selfreward.dashboard.metrics import curves as training_curves_of
    from selfreward.dashboard.metrics import trends as trends_of
    from selfreward.reports.plots import training_curves

    if not layout.run_dir.is_dir():
        raise InputError(f"{layout.run_dir}: no such run (artifact root {layout.root})")
    cfg: dict[str, Any] = {}
    if layout.config_path.is_file():
        try:
            cfg = yaml.safe_load(layout.config_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"{layout.config_path}: not valid YAML ({exc})") from None
    iterations = _iterations(layout)
    reports = iteration_reports(layout)
    trends = trends_of(layout)
    parts = [f"<h1>Run {_e(layout.run)}</h1>"]
    parts.append(
        f"<p>{_e(cfg.get('variant', '?'))}, base model <code>{_e((cfg.get('model') or {}).get('base'))}</code>, "
        f"{len(reports)} evaluated iteration(s) of {_e(cfg.get('iterations', '?'))}; "
        f'<span class="muted">{_e(layout.run_dir)}</span></p>'
    )
    parts.append(_summary_section(layout, trends, reports))

    parts.append("<h2>Metrics by model</h2>")
    if reports:
        labels, series = trend_series(reports)
        if series and len(reports) >= 2:  # one evaluated iteration is one dot: its plots are below
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

    curves = training_curves_of(layout)
    parts.append("<h2>Training curves</h2>")
    if any(c["points"] for c in curves):
        parts.append(_img(training_curves(curves, f"Run {layout.run}: training curves"), "training curves"))
    else:
        parts.append('<p class="muted">No training log yet (models/&lt;m&gt;/log_history.jsonl).</p>')

    parts.append(_examples_section(layout, iterations))

    for t in iterations:
        parts.append(f"<h2>Iteration {t}</h2>")
        rows = _stage_rows(layout, t) if layout.iter_dir(t).is_dir() else []
        if rows:
            parts.append(_table(["stage", "time", "counts"], rows))
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

    raw = ['<details id="raw-manifests"><summary>Raw manifests (models and stages)</summary>']
    if cfg:
        raw.append(_manifest_block("config.yaml", cfg))
    models = sorted(layout.models_dir.glob("*/manifest.json")) if layout.models_dir.is_dir() else []
    for path in models:
        raw.append(_manifest_block(f"model {path.parent.name}", read_manifest(path) or {}))
    if not models:
        raw.append('<p class="muted">No model written yet.</p>')
    for t in iterations:
        for path in sorted(layout.iter_dir(t).glob("*.manifest.json")) if layout.iter_dir(t).is_dir() else []:
            raw.append(_manifest_block(f"iteration {t}: {path.name}", read_manifest(path) or {}))
    raw.append("</details>")
    parts.append("".join(raw))

    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>selfreward run {_e(layout.run)}</title><style>{CSS}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )
    out = out_path or layout.run_dir / "report.html"
    atomic_write_text(out, page)
    return out
