"""Judge collapse, tracked every iteration (every method that judges).

The original study found that self-rewarding can ruin a small model's judge: its scores
collapse onto one value and stop telling answers apart. For iteration t, `judge_health` reads the
feedback judge's verdicts on M(t)'s candidates (iter-<t>/judgments.jsonl) and the pairs it led
to, and reports:
- `score_shares`: the share of candidates whose mean score rounds (half up) to each of 0..5;
- `entropy_bits`: the entropy of that distribution (log2 6 = 2.585 for uniform, 0 for one score);
- `top_score`, `top_share`: the most frequent score and its share;
- `parse_failure_rate`: verdicts without a score over all verdicts;
- `chosen_length`, `rejected_length`: mean characters of the chosen and rejected answers;
- `collapsed`: top_share above `eval.collapse_threshold` (0.9). A collapsed judge is flagged in
  the evaluate stage, the iteration's status and the report, and the next iteration does not
  start unless `eval.continue_on_collapse` says so.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from selfreward.schemas import JudgmentRecord, read_records
from selfreward.storage import RunLayout, read_manifest


def score_shares(judgments: list[JudgmentRecord]) -> tuple[dict[str, float], int]:
    scores = [int(j.score + 0.5) for j in judgments if j.score is not None]
    counts = Counter(scores)
    n = len(scores)
    return ({str(s): round(counts[s] / n, 4) for s in range(6)} if n else {}), n


def judge_health(layout: RunLayout, t: int, threshold: float) -> dict[str, Any] | None:
    """The judge's health in iteration t (see the module docstring); None without judgments."""
    path = layout.stage_file(t, "judgments")
    if not path.is_file():
        return None
    judgments = read_records(path, JudgmentRecord)
    if not judgments:
        return None
    shares, scored = score_shares(judgments)
    verdicts = sum(len(j.verdicts) for j in judgments)
    failures = sum(1 for j in judgments for v in j.verdicts if v.score is None)
    out: dict[str, Any] = {
        "judge": judgments[0].judge,
        "candidates": len(judgments),
        "scored": scored,
        "score_shares": shares,
        "parse_failure_rate": round(failures / verdicts, 4) if verdicts else 0.0,
        "threshold": threshold,
    }
    if scored:
        top = max(range(6), key=lambda s: (shares[str(s)], s))
        out.update(
            entropy_bits=round(-sum(p * math.log2(p) for p in shares.values() if p > 0), 4),
            top_score=top,
            top_share=shares[str(top)],
            collapsed=shares[str(top)] > threshold,
        )
    else:
        out.update(entropy_bits=None, top_score=None, top_share=None, collapsed=True)
    pairs = read_manifest(layout.stage_manifest(t, "pairs")) or {}
    lengths = pairs.get("mean_lengths") or {}
    out.update(chosen_length=lengths.get("chosen"), rejected_length=lengths.get("rejected"))
    return out


def collapse_message(t: int, health: dict[str, Any]) -> str:
    if health.get("top_share") is None:
        return f"judge collapse in iteration {t}: no candidate got a score ({health['judge']})"
    return (
        f"judge collapse in iteration {t}: {health['top_share']:.0%} of the scores of {health['judge']} "
        f"are {health['top_score']} (eval.collapse_threshold {health['threshold']})"
    )


def collapse_stop(layout: RunLayout, t: int, config: Any) -> str | None:
    """Why iteration t+1 must not start (iteration t's judge collapsed), or None."""
    if t < 1 or config.eval.continue_on_collapse:
        return None
    evaluation = read_manifest(layout.stage_manifest(t, "evaluate")) or {}
    if not (evaluation.get("metrics") or {}).get("judge_collapsed"):
        return None
    health = judge_health(layout, t, config.eval.collapse_threshold)
    reason = collapse_message(t, health) if health else f"judge collapse in iteration {t}"
    return f"{reason}; set eval.continue_on_collapse: true to train on anyway"
