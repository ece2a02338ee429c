"""Runs side by side: `selfreward compare RUN_A RUN_B ...` (docs/methods.md, "Comparing methods").

Per run and iteration, from what the run wrote (its config, stage manifests, model manifests
and eval/iter-<t>/): the head-to-head win rate of M(t+1) against the fixed baseline (with its
interval) and against M(t), the length-controlled win rate against the fixed baseline
(computed from the iteration's verdicts and answers, `evaluation.metrics.alpaca`), the judge's
agreement with human ranks (pairwise accuracy; the judge benchmark's self-judge accuracy where
configured), the judge-collapse indicators (top-score share, collapsed), the pairs by kind and
the wall time of each stage.

Comparable: runs whose configs differ only in the method (`variant`) and the method's own
fields (`Method.config_fields`), and whose fixed baselines are the same weights. Fields that
are the deployment's or the run's identity (name, artifact root, services, iterations) are not
compared. Everything else that differs is listed, and the comparison is flagged.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfreward.config import RunConfig, build_config, read_yaml
from selfreward.errors import EmptyResultError, InputError
from selfreward.reports.markdown import interval, num, pct
from selfreward.reports.trends import eval_dir, iteration_reports
from selfreward.storage import RunLayout, read_jsonl, read_manifest

# fields that never make runs incomparable: names, the deployment, how far a run goes
NOT_COMPARED = ("name", "variant", "iterations", "artifact_root", "services", "eval.continue_on_collapse")


@dataclass
class RunSummary:
    run: str
    variant: str
    config: RunConfig
    iterations: list[dict[str, Any]] = field(default_factory=list)
    fixed_baseline_sha256: str | None = None


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}


def _owned(path: str, prefixes: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def config_differences(runs: Sequence[RunSummary]) -> list[dict[str, Any]]:
    """The config fields (dotted) whose values differ between the runs, beyond the methods' own
    fields and the fields that are not compared: [{field, values: {run: value}}]."""
    from selfreward.methods import method_named

    owned = [*NOT_COMPARED]
    for r in runs:
        owned += list(method_named(r.variant).config_fields)
    flat = {r.run: _leaves(r.config.model_dump(mode="json")) for r in runs}
    fields = sorted({f for leaves in flat.values() for f in leaves})
    out = []
    for f in fields:
        if _owned(f, owned):
            continue
        values = {run: leaves.get(f) for run, leaves in flat.items()}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            out.append({"field": f, "values": values})
    return out


def _lc_vs_fixed(layout: RunLayout, report: Mapping[str, Any]) -> float | None:
    """The length-controlled win rate of the iteration's model against the fixed baseline, from
    its verdicts (preference per prompt) and both answer files; None where not computable."""
    from selfreward.evaluation.answers import safe_name
    from selfreward.evaluation.metrics.alpaca import length_controlled_win_rate

    model, fixed = report.get("model"), report.get("fixed_baseline")
    if not model or not fixed:
        return None
    t = int(report.get("iteration", 0))
    verdicts = eval_dir(layout, t) / f"verdicts-{safe_name(model)}-vs-{safe_name(fixed)}.jsonl"
    answers = {m: layout.eval_dir / "answers" / f"answers-{safe_name(m)}.jsonl" for m in (model, fixed)}
    if not verdicts.is_file() or not all(p.is_file() for p in answers.values()):
        return None
    text = {
        m: {str(rec.get("key", "")).split("|", 1)[0]: str(rec.get("output", "")) for _, rec in read_jsonl(p)}
        for m, p in answers.items()
    }
    prefs, a_len, b_len = [], [], []
    for _, v in read_jsonl(verdicts):
        pid, pref = str(v.get("prompt_id")), v.get("preference")
        if pref is None or pid not in text[model] or pid not in text[fixed]:
            continue
        prefs.append(float(pref))
        a_len.append(len(text[model][pid]))
        b_len.append(len(text[fixed][pid]))
    if len(prefs) < 2:
        return None
    try:
        return float(length_controlled_win_rate(prefs, a_len, b_len).win_rate)
    except (ValueError, ArithmeticError, EmptyResultError):  # a degenerate fit: not available
        return None


def _self_bench(report: Mapping[str, Any]) -> float | None:
    for bench in (report.get("judge_bench") or {}).values():
        for j in bench.get("judges", []):
            if j.get("role") == "self":
                return j.get("metrics", {}).get("accuracy")
    return None


def summarize(layout: RunLayout) -> RunSummary:
    if not layout.config_path.is_file():
        raise InputError(f"{layout.run_dir}: no run there (no config.yaml; artifact root {layout.root})")
    config = build_config(read_yaml(layout.config_path), environ={}, source=str(layout.config_path))
    from selfreward.methods import method_named
    from selfreward.stages.plan import stages_of

    summary = RunSummary(layout.run, config.variant, config)
    fixed = (
        read_manifest(layout.model_manifest(config.eval.fixed_baseline))
        if config.eval.fixed_baseline != "none"
        else None
    )
    summary.fixed_baseline_sha256 = (fixed or {}).get("adapter_sha256")
    reports = {int(r.get("iteration", 0)): r for r in iteration_reports(layout)}
    method = method_named(config.variant)
    for t in range(1, config.iterations + 1):
        manifests = {
            s.name: read_manifest(layout.stage_manifest(t, s.name)) for s in stages_of(t, method.name)
        }
        if not any(manifests.values()):
            break
        report = reports.get(t, {})
        h2h, fixed_h2h = report.get("head2head") or {}, report.get("head2head_fixed") or {}
        health = report.get("judge_health") or {}
        pairs = manifests.get("pairs") or {}
        summary.iterations.append(
            {
                "t": t,
                "model": report.get("model"),
                "win_rate_vs_fixed": fixed_h2h.get("win_rate"),
                "win_rate_vs_fixed_ci": (fixed_h2h.get("intervals") or {}).get("win_rate"),
                "fixed_baseline": report.get("fixed_baseline"),
                "win_rate_vs_previous": h2h.get("win_rate"),
                "win_rate_vs_previous_ci": (h2h.get("intervals") or {}).get("win_rate"),
                "lc_win_rate_vs_fixed": _lc_vs_fixed(layout, report) if report else None,
                "judge_human_agreement": (report.get("reward_model") or {}).get("pairwise_accuracy"),
                "judge_bench_self": _self_bench(report),
                "judge_top_share": health.get("top_share"),
                "judge_collapsed": health.get("collapsed"),
                "pairs": pairs.get("pairs"),
                "pairs_by_kind": pairs.get("pairs_by_kind") or {},
                "seconds": {
                    s: m.get("seconds_total", m.get("seconds")) for s, m in manifests.items() if m is not None
                },
            }
        )
    return summary


def compare_runs(layouts: Sequence[RunLayout]) -> dict[str, Any]:
    """The comparison of the runs (see the module docstring) as JSON-ready data."""
    if len(layouts) < 2:
        raise InputError("compare needs at least two runs")
    runs = [summarize(layout) for layout in layouts]
    differences = config_differences(runs)
    baselines = {r.run: r.fixed_baseline_sha256 for r in runs}
    same_baseline = len(set(baselines.values())) == 1 and None not in baselines.values()
    reasons = []
    if differences:
        reasons.append("configs differ beyond the method: " + ", ".join(d["field"] for d in differences))
    if not same_baseline:
        reasons.append("the fixed baselines are not the same weights (or one is missing)")
    return {
        "runs": [{"run": r.run, "variant": r.variant, "iterations": r.iterations} for r in runs],
        "comparable": not reasons,
        "not_comparable_because": reasons,
        "config_differences": differences,
        "fixed_baseline_sha256": baselines,
    }


COLUMNS = (
    "run",
    "method",
    "iter",
    "win vs fixed [95%]",
    "LC win vs fixed",
    "win vs previous [95%]",
    "judge vs humans",
    "judge bench (self)",
    "judge top share",
    "collapsed",
    "pairs by kind",
    "wall s by stage",
)


def rows_of(data: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for run in data["runs"]:
        for it in run["iterations"]:
            rows.append(
                [
                    run["run"],
                    run["variant"],
                    str(it["t"]),
                    f"{pct(it['win_rate_vs_fixed'])} {interval(it['win_rate_vs_fixed_ci'])}",
                    pct(it["lc_win_rate_vs_fixed"]),
                    f"{pct(it['win_rate_vs_previous'])} {interval(it['win_rate_vs_previous_ci'])}",
                    pct(it["judge_human_agreement"]),
                    pct(it["judge_bench_self"]),
                    pct(it["judge_top_share"]),
                    "n/a" if it["judge_collapsed"] is None else ("yes" if it["judge_collapsed"] else "no"),
                    ", ".join(f"{k}={v}" for k, v in it["pairs_by_kind"].items()) or "none",
                    " ".join(f"{s}={num(v, 0)}" for s, v in it["seconds"].items()),
                ]
            )
    return rows


def compare_html(data: Mapping[str, Any]) -> str:
    """One self-contained page: the verdict on comparability, the table, the differing fields."""
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows_of(data))
    if data["comparable"]:
        verdict = "<p>The runs differ only in the method; their fixed baselines are the same weights.</p>"
    else:
        verdict = "".join(
            f'<p class="warn">Not comparable: {e(r)}.</p>' for r in data["not_comparable_because"]
        )
    diffs = "".join(
        "<tr><td>"
        + e(d["field"])
        + "</td>"
        + "".join(f"<td>{e(str(v))}</td>" for v in d["values"].values())
        + "</tr>"
        for d in data["config_differences"]
    )
    names = "".join(f"<th>{e(r['run'])}</th>" for r in data["runs"])
    diff_table = (
        f"<h2>Config fields that differ</h2><table><tr><th>field</th>{names}</tr>{diffs}</table>"
        if diffs
        else ""
    )
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}.warn{color:#a00;font-weight:bold}"
    )
    title = "Runs compared: " + ", ".join(r["run"] for r in data["runs"])
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{style}</style></head>"
        f"<body><h1>{e(title)}</h1>{verdict}<table><tr>{head}</tr>{body}</table>{diff_table}</body></html>\n"
    )


def write_compare(data: Mapping[str, Any], html_path: Path | None, json_path: Path | None) -> None:
    from selfreward.storage import atomic_write_text

    if html_path is not None:
        atomic_write_text(html_path, compare_html(data))
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(data, indent=2, default=str) + "\n")
