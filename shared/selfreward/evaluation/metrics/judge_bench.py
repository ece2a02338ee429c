"""Agreement of a judge with human preference labels (the judge benchmark; docs/evaluation.md).

Input: one `ItemVerdict` per benchmark item whose human label is not a tie: the human-preferred
side (`human`: a or b), the judge's pick (`a`, `b`, `tie`, or None when judging failed), both
responses' lengths (characters) and, for pairwise judges, the winner of each order (`ab`: A shown
first; `ba`: B shown first; winners in A/B terms, None when that order gave no winner).

Definitions (n = items with a pick; failures are excluded from every rate and counted):
- credit of an item = 1 if pick = human, 0.5 if pick = tie, 0 otherwise;
- accuracy = mean credit = (correct + 0.5 x judge ties) / n; accuracy with ties counted wrong =
  correct / n; 95% percentile-bootstrap intervals of both (`winrate.bootstrap_intervals`: B
  resamples of the n items, numpy PCG64 seeded);
- parse-failure rate = failures / (n + failures);
- per subset: the same over the subset's items;
- position consistency (pairwise) = items whose two orders name the same winner / items whose
  two orders both named one; position bias = share of the inconsistent items (each order named a
  different winner) in which the first-shown response won both times;
- length bias: accuracy over items whose human-preferred response is the longer one, and over
  items where it is the shorter one (equal lengths in neither); the judge's rate of preferring
  the longer response = picks of the longer / picks of a or b on items of unequal lengths.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from selfreward.evaluation.metrics.winrate import bootstrap_intervals

Pick = Literal["a", "b", "tie"]


@dataclass(frozen=True)
class ItemVerdict:
    human: Literal["a", "b"]
    pick: Pick | None  # None: judging failed (excluded, counted)
    len_a: int
    len_b: int
    subset: str | None = None
    ab: Literal["A", "B"] | None = None  # pairwise: the winner when A was shown first
    ba: Literal["A", "B"] | None = None  # pairwise: the winner when B was shown first
    pairwise: bool = False


def credit(v: ItemVerdict) -> float:
    if v.pick == "tie":
        return 0.5
    return 1.0 if v.pick == v.human else 0.0


def _rates(verdicts: Sequence[ItemVerdict], samples: int, seed: int, confidence: float) -> dict[str, Any]:
    judged = [v for v in verdicts if v.pick is not None]
    failures = len(verdicts) - len(judged)
    out: dict[str, Any] = {
        "n": len(judged),
        "failures": failures,
        "parse_failure_rate": failures / len(verdicts) if verdicts else None,
        "correct": sum(1 for v in judged if v.pick == v.human),
        "judge_ties": sum(1 for v in judged if v.pick == "tie"),
        "accuracy": None,
        "accuracy_ties_wrong": None,
        "intervals": {},
    }
    if judged:
        credits = np.asarray([credit(v) for v in judged], dtype=float)
        out["accuracy"] = float(credits.mean())
        out["accuracy_ties_wrong"] = out["correct"] / len(judged)
        iv = bootstrap_intervals(credits, samples, seed, confidence)
        out["intervals"] = {"accuracy": list(iv["win_rate"]), "accuracy_ties_wrong": list(iv["win"])}
    return out


def _mean_credit(items: list[ItemVerdict]) -> float | None:
    return sum(credit(v) for v in items) / len(items) if items else None


def length_bias(judged: Sequence[ItemVerdict]) -> dict[str, Any]:
    def preferred_longer(v: ItemVerdict) -> bool:
        return (v.len_a > v.len_b) if v.human == "a" else (v.len_b > v.len_a)

    unequal = [v for v in judged if v.len_a != v.len_b]
    longer = [v for v in unequal if preferred_longer(v)]
    shorter = [v for v in unequal if not preferred_longer(v)]
    picked = [v for v in unequal if v.pick in ("a", "b")]
    picked_longer = sum(1 for v in picked if (v.len_a > v.len_b) == (v.pick == "a"))
    return {
        "accuracy_human_prefers_longer": _mean_credit(longer),
        "n_human_prefers_longer": len(longer),
        "accuracy_human_prefers_shorter": _mean_credit(shorter),
        "n_human_prefers_shorter": len(shorter),
        "equal_lengths": len(judged) - len(unequal),
        "judge_prefers_longer_rate": picked_longer / len(picked) if picked else None,
        "judge_picks_unequal": len(picked),
        "human_prefers_longer_rate": len(longer) / len(unequal) if unequal else None,
    }


def position_bias(judged: Sequence[ItemVerdict]) -> dict[str, Any] | None:
    pairwise = [v for v in judged if v.pairwise]
    if not pairwise:
        return None
    both = [v for v in pairwise if v.ab is not None and v.ba is not None]
    consistent = [v for v in both if v.ab == v.ba]
    inconsistent = [v for v in both if v.ab != v.ba]
    first = sum(1 for v in inconsistent if v.ab == "A")  # A won shown first, B won shown first
    return {
        "both_orders": len(both),
        "consistent": len(consistent),
        "consistency": len(consistent) / len(both) if both else None,
        "inconsistent": len(inconsistent),
        "first_position_wins": first,
        "first_position_share": first / len(inconsistent) if inconsistent else None,
    }


def bench_metrics(
    verdicts: Sequence[ItemVerdict], *, bootstrap_samples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict[str, Any]:
    """Every metric of the module docstring for one judge on one set."""
    out = _rates(verdicts, bootstrap_samples, seed, confidence)
    judged = [v for v in verdicts if v.pick is not None]
    by_subset: dict[str, list[ItemVerdict]] = defaultdict(list)
    for v in verdicts:
        if v.subset is not None:
            by_subset[v.subset].append(v)
    out["subsets"] = {
        name: _rates(items, bootstrap_samples, seed, confidence) for name, items in sorted(by_subset.items())
    }
    out["length"] = length_bias(judged)
    out["position"] = position_bias(judged)
    out["confidence"] = confidence
    out["bootstrap_samples"] = bootstrap_samples
    out["seed"] = seed
    return out
