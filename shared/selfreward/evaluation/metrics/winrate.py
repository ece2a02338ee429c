"""Head-to-head win/tie/loss of model A against model B, with 95% bootstrap intervals.

Input: one preference per prompt, p = 1.0 (A better), 0.0 (B better), 0.5 (tie: the judge
preferred each answer in one of the two orders, called it a tie, or both answers are
identical), or None when judging failed (excluded from every rate, counted as `failures`).
Fractional preferences are allowed: p > 0.5 counts as a win, p < 0.5 as a loss.

- win / tie / loss share = count / n over the n judged prompts;
- win rate = mean(p) = (wins + ties / 2) / n for preferences in {0, 0.5, 1};
- intervals: percentile bootstrap over prompts: B resamples of n prompts drawn with
  replacement (numpy PCG64 seeded with `seed`), each statistic recomputed per resample, the
  interval is its (2.5%, 97.5%) quantiles (numpy's default linear interpolation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from selfreward.errors import EmptyResultError

STATS = ("win", "tie", "loss", "win_rate")


@dataclass
class HeadToHead:
    a: str
    b: str
    n: int  # judged prompts
    wins: int
    ties: int
    losses: int
    failures: int  # prompts whose judging failed (excluded)
    win: float
    tie: float
    loss: float
    win_rate: float  # mean preference: (wins + ties / 2) / n
    intervals: dict[str, tuple[float, float]]  # STATS -> (low, high)
    confidence: float
    bootstrap_samples: int
    seed: int

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["intervals"] = {k: list(v) for k, v in self.intervals.items()}
        return out


def bootstrap_intervals(
    prefs: np.ndarray, samples: int, seed: int, confidence: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap intervals of the win/tie/loss shares and the win rate."""
    n = len(prefs)
    rng = np.random.Generator(np.random.PCG64(seed))
    idx = rng.integers(0, n, size=(samples, n))
    resampled = prefs[idx]
    per_sample = {
        "win": (resampled > 0.5).mean(axis=1),
        "tie": (resampled == 0.5).mean(axis=1),
        "loss": (resampled < 0.5).mean(axis=1),
        "win_rate": resampled.mean(axis=1),
    }
    alpha = (1.0 - confidence) / 2
    return {
        k: (float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))) for k, v in per_sample.items()
    }


def head_to_head(
    preferences: Sequence[float | None],
    *,
    a: str = "A",
    b: str = "B",
    bootstrap_samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> HeadToHead:
    """Win/tie/loss of A against B from per-prompt preferences (1 = A better)."""
    judged = [p for p in preferences if p is not None]
    failures = len(preferences) - len(judged)
    if not judged:
        raise EmptyResultError(
            f"head-to-head {a} vs {b}: no judged prompt ({failures} of {len(preferences)} failed)"
        )
    for p in judged:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"preference {p!r} is outside [0, 1]")
    prefs = np.asarray(judged, dtype=float)
    n = len(prefs)
    wins, ties, losses = int((prefs > 0.5).sum()), int((prefs == 0.5).sum()), int((prefs < 0.5).sum())
    return HeadToHead(
        a=a,
        b=b,
        n=n,
        wins=wins,
        ties=ties,
        losses=losses,
        failures=failures,
        win=wins / n,
        tie=ties / n,
        loss=losses / n,
        win_rate=float(prefs.mean()),
        intervals=bootstrap_intervals(prefs, bootstrap_samples, seed, confidence),
        confidence=confidence,
        bootstrap_samples=bootstrap_samples,
        seed=seed,
    )


def evidence(data: dict[str, Any], min_n: int) -> dict[str, Any]:
    """The summary rule of a head-to-head (docs/evaluation.md): a verdict only when at least `min_n`
    prompts were judged and the win rate's interval excludes 50%; else "no evidence of a difference"."""
    n, a, b = data["n"], data["a"], data["b"]
    lo, hi = data["intervals"]["win_rate"]
    conf = data.get("confidence", 0.95)
    shown = f"win rate {100 * data['win_rate']:.1f}% [{100 * lo:.1f}%, {100 * hi:.1f}%], n={n}"
    if n < min_n:
        return {
            "evidence": False,
            "text": f"no evidence of a difference between {a} and {b}: only {n} judged prompts "
            f"(eval.min_prompts {min_n}); {shown}",
        }
    if lo <= 0.5 <= hi:
        return {
            "evidence": False,
            "text": f"no evidence of a difference between {a} and {b}: the {conf:.0%} interval contains 50%; {shown}",
        }
    better = lo > 0.5
    return {"evidence": True, "text": f"{a} {'beats' if better else 'loses to'} {b}: {shown}"}
