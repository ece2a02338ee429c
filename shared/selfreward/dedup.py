"""Near-duplicate detection of prompts by ROUGE-L, as Self-Instruct filters its generations.

ROUGE-L F-measure between two texts = harmonic mean of LCS/len(a) and LCS/len(b) over
lower-cased word tokens (the `rouge_score` package's default tokenisation, minus stemming).
A new prompt is a near-duplicate when its ROUGE-L F with any kept prompt reaches the
threshold (Self-Instruct uses 0.7).
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(a: list[str], b: list[str]) -> float:
    if not a or not b:
        return 0.0
    lcs = lcs_length(a, b)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def normalise(text: str) -> str:
    return " ".join(tokens(text))


class NearDuplicateIndex:
    """Kept texts, with exact (normalised) and ROUGE-L near-duplicate checks."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._exact: set[str] = set()
        self._tokens: list[list[str]] = []

    def __len__(self) -> int:
        return len(self._tokens)

    def check(self, text: str) -> tuple[str | None, float]:
        """(None, best score) if new; ("exact_duplicate" | "near_duplicate", score) otherwise."""
        norm = normalise(text)
        if norm in self._exact:
            return "exact_duplicate", 1.0
        toks = norm.split()
        best = max((rouge_l(toks, other) for other in self._tokens), default=0.0)
        if best >= self.threshold:
            return "near_duplicate", best
        return None, best

    def add(self, text: str) -> None:
        norm = normalise(text)
        self._exact.add(norm)
        self._tokens.append(norm.split())
