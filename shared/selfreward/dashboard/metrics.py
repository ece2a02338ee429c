"""What the dashboard and the report chart: trends across iterations, training curves, wall time.

- trends: per evaluated iteration (eval/iter-<t>/report.json, selfreward.reports.trends): the
  win rate against the previous model with its interval and the summary rule's verdict, the
  judge's agreement with human ranks (reward-model pairwise accuracy), the judge's score shares
  and collapse flag, parse failures, pairs made and dropped, chosen and rejected lengths;
- curves: per trained model (models/<m>/log_history.jsonl, written by the trainer): loss,
  reward margin and accuracy per logged step (SFT: loss and token accuracy);
- wall: seconds of every finished stage (its manifest).
"""

from __future__ import annotations

import json
from typing import Any

from selfreward.reports.trends import iteration_reports
from selfreward.stages import plan
from selfreward.storage import RunLayout, read_manifest

LOG_HISTORY = "log_history.jsonl"  # selfreward.training.runner.LOG_HISTORY (torch-free here)
CURVE_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "mean_token_accuracy", "learning_rate")


def _iteration_of(report: dict[str, Any]) -> int | None:
    t = report.get("iteration")
    return t if isinstance(t, int) else None


def trends(layout: RunLayout) -> list[dict[str, Any]]:
    out = []
    for r in iteration_reports(layout):
        t = _iteration_of(r)
        h = r.get("head2head") or {}
        rm = r.get("reward_model") or {}
        jh = r.get("judge_health") or {}
        pairs = (read_manifest(layout.stage_manifest(t, "pairs")) or {}) if t is not None else {}
        out.append(
            {
                "t": t,
                "model": r.get("model"),
                "baseline": r.get("baseline"),
                "win_rate": h.get("win_rate"),
                "interval": (h.get("intervals") or {}).get("win_rate"),
                "n": h.get("n"),
                "wins": h.get("wins"),
                "ties": h.get("ties"),
                "losses": h.get("losses"),
                "evidence": (h.get("summary") or {}).get("evidence"),
                "summary": (h.get("summary") or {}).get("text"),
                "judge": h.get("judge") or r.get("judge"),
                "judge_agreement": rm.get("pairwise_accuracy"),
                "score_shares": jh.get("score_shares"),
                "collapsed": jh.get("collapsed"),
                "top_share": jh.get("top_share"),
                "parse_failure_rate": jh.get("parse_failure_rate"),
                "pairs": pairs.get("pairs"),
                "dropped": pairs.get("dropped"),
                "chosen_length": jh.get("chosen_length"),
                "rejected_length": jh.get("rejected_length"),
                "mean_answer_chars": h.get("mean_answer_chars"),
            }
        )
    for i, row in enumerate(out):
        row["sentence"] = summary_sentence(row, out[i - 1] if i else None)
    return out


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def summary_sentence(trend: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The line a person reads first about iteration t: "M(t+1) vs M(t): win rate X% [lo, hi],
    judge agreement Y% (change), length change", and a verdict only where the interval excludes
    50% with enough prompts (the evaluation's summary rule, selfreward.evaluation.metrics.winrate)."""
    t = trend.get("t") or 0
    new, old = f"M{t + 1}", f"M{t}"
    parts = [f"{new} vs {old}: win rate {_pct(trend.get('win_rate'))}"]
    iv = trend.get("interval")
    if iv:
        parts[0] += f" [{_pct(iv[0])}, {_pct(iv[1])}]"
    if trend.get("n") is not None:
        parts[0] += f" on {trend['n']} prompts"
    agreement = trend.get("judge_agreement")
    if agreement is not None:
        text = f"judge agreement with humans {_pct(agreement)}"
        before = (previous or {}).get("judge_agreement")
        if before is not None:
            text += f" ({100 * (agreement - before):+.1f} points)"
        parts.append(text)
    chars = trend.get("mean_answer_chars") or {}
    a, b = chars.get(trend.get("model")), chars.get(trend.get("baseline"))
    if isinstance(a, int | float) and isinstance(b, int | float) and b > 0:
        parts.append(f"answers {a:.0f} vs {b:.0f} characters ({100 * (a - b) / b:+.0f}%)")
    if trend.get("evidence") and trend.get("win_rate") is not None:
        verdict = f"{new} is better than {old}" if trend["win_rate"] > 0.5 else f"{new} is worse than {old}"
    else:
        verdict = "No evidence of a difference"
    return {"text": "; ".join(parts) + ".", "verdict": verdict, "evidence": bool(trend.get("evidence"))}


def curves(layout: RunLayout) -> list[dict[str, Any]]:
    """Training curves of every model folder holding a log history, in model order (m1, m2, ...)."""
    out = []
    if not layout.models_dir.is_dir():
        return out
    folders = [p for p in layout.models_dir.iterdir() if (p / LOG_HISTORY).is_file()]

    def order(p: Any) -> tuple[int, str]:
        digits = p.name.removeprefix("m")
        return (int(digits) if digits.isdigit() else 1 << 30, p.name)

    for folder in sorted(folders, key=order):
        points = []
        with open(folder / LOG_HISTORY, encoding="utf-8") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and "step" in row:
                    points.append({k: row[k] for k in ("step", *CURVE_KEYS) if k in row})
        manifest = read_manifest(folder / "manifest.json") or {}
        out.append({"model": folder.name, "kind": manifest.get("kind"), "points": points})
    return out


def wall(layout: RunLayout, variant: str, iterations: list[int]) -> list[dict[str, Any]]:
    out = []
    for t in iterations:
        for s in plan.stages_of(t, variant):
            m = read_manifest(layout.stage_manifest(t, s.name))
            if m is not None and isinstance(m.get("seconds"), int | float):
                out.append({"t": t, "stage": s.name, "seconds": m["seconds"]})
    return out


def run_metrics(layout: RunLayout, variant: str, iterations: list[int]) -> dict[str, Any]:
    return {"trends": trends(layout), "curves": curves(layout), "wall": wall(layout, variant, iterations)}
