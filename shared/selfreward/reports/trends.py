"""The evaluations of a run across iterations: where they live and the metric trends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selfreward.errors import InputError
from selfreward.storage import RunLayout

TREND_METRICS = {
    "win rate vs previous model": ("head2head", "win_rate"),
    "win rate vs fixed baseline": ("head2head_fixed", "win_rate"),
    "RM pairwise accuracy": ("reward_model", "pairwise_accuracy"),
    "RM exact match": ("reward_model", "exact_match"),
    "RM Spearman (per prompt)": ("reward_model", "spearman"),
    "judge: share of its top score": ("judge_health", "top_share"),
    "judge: score entropy / log2(6)": ("judge_health", "entropy_norm"),
    "judge: parse-failure rate": ("judge_health", "parse_failure_rate"),
}
# mean characters of the answers the pairs stage chose and rejected (their own axis: not rates)
LENGTH_METRICS = {
    "chosen answers": ("judge_health", "chosen_length"),
    "rejected answers": ("judge_health", "rejected_length"),
}


def eval_dir(layout: RunLayout, t: int) -> Path:
    return layout.eval_dir / f"iter-{t}"


def iteration_reports(layout: RunLayout) -> list[dict[str, Any]]:
    """Every eval/iter-<t>/report.json of the run, in iteration order."""
    found = []
    if layout.eval_dir.is_dir():
        for d in layout.eval_dir.glob("iter-*"):
            suffix = d.name.removeprefix("iter-")
            if suffix.isdigit() and (d / "report.json").is_file():
                try:
                    found.append((int(suffix), json.loads((d / "report.json").read_text(encoding="utf-8"))))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{d / 'report.json'}: not valid JSON ({exc.msg})") from None
    return [data for _, data in sorted(found, key=lambda x: x[0])]


def trend_series(reports: list[dict[str, Any]]) -> tuple[list[str], dict[str, list[float | None]]]:
    """The model labels and, per rate of TREND_METRICS measured at least once, its values."""
    labels = [str(r.get("model")) for r in reports]
    series: dict[str, list[float | None]] = {}
    for name, (section, key) in TREND_METRICS.items():
        if key == "entropy_norm":
            values = [
                None if (h := r.get(section) or {}).get("entropy_bits") is None else h["entropy_bits"] / 2.585
                for r in reports
            ]
        else:
            values = [(r.get(section) or {}).get(key) for r in reports]
        if any(v is not None for v in values):
            series[name] = values
    series.update(bench_series(reports))
    return labels, series


def bench_series(reports: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Judge-benchmark accuracy per set and judge role (self, teacher, length:longer, ...) by model:
    a collapsing self-judge shows as a falling line next to the length baseline."""
    keys: dict[tuple[str, str], None] = {}
    for r in reports:
        for name, bench in (r.get("judge_bench") or {}).items():
            for j in bench.get("judges", []):
                if j.get("role") in ("self", "teacher", "length:longer"):
                    keys[(name, j["role"])] = None
    series: dict[str, list[float | None]] = {}
    for name, role in keys:
        values: list[float | None] = []
        for r in reports:
            judges = ((r.get("judge_bench") or {}).get(name) or {}).get("judges", [])
            values.append(next((j["metrics"]["accuracy"] for j in judges if j.get("role") == role), None))
        series[f"judge bench {name}: {role}"] = values
    return series


def length_series(reports: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Per LENGTH_METRICS series measured at least once, its mean characters by model."""
    series: dict[str, list[float | None]] = {}
    for name, (section, key) in LENGTH_METRICS.items():
        values = [(r.get(section) or {}).get(key) for r in reports]
        if any(v is not None for v in values):
            series[name] = values
    return series
