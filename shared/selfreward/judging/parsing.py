"""Reading verdicts: the strict "Score: N" rule, pairwise winners, and scores from logprobs.

Score rule (docs/judge.md): the LAST "Score:" label in the verdict decides (the label's case
and markdown emphasis around it are ignored: "Score:", "score:", "**Score:**"). The value is
the first whitespace-delimited token after the label, without trailing punctuation
(".", ",", ";", "!", "*", ")", quotes); it must be one integer 0..5. Anything else is a
failure with a reason, never a score:

    "" -> empty, no label -> no_score, "Score:" then nothing -> no_value,
    "Score: 4.5" -> not_an_integer, "Score: five" / "Score: 4/5" -> not_a_number,
    "Score: 7" -> out_of_range

Pairwise rule: the verdict, stripped of surrounding whitespace, must be exactly one of the
two identifiers ("m" = output_1, "M" = output_2, AlpacaEval's convention); else
`unparseable`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

SCORE_MIN, SCORE_MAX = 0, 5
SCORE_LABEL = re.compile(r"(?i)(?:\*{1,2}|_{1,2})?\bscore(?:\*{1,2}|_{1,2})?\s*:(?:\*{1,2}|_{1,2})?")
_TRAILING = ".,;!*)\"'`_]"
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(?:\d+[.,]\d*|[.,]\d+)(?:e[+-]?\d+)?", re.IGNORECASE)

# identifiers of the pairwise template: output_1 -> "m", output_2 -> "M"
PAIR_IDS = ("m", "M")
SCORE_DIGITS = tuple(str(d) for d in range(SCORE_MIN, SCORE_MAX + 1))


def parse_score(text: str) -> tuple[float | None, str | None]:
    """(score, None) for a valid verdict; (None, reason) otherwise."""
    if not text or not text.strip():
        return None, "empty"
    labels = list(SCORE_LABEL.finditer(text))
    if not labels:
        return None, "no_score"
    rest = text[labels[-1].end() :].lstrip()
    token = rest.split(maxsplit=1)[0] if rest else ""
    token = token.lstrip("*_`").rstrip(_TRAILING)
    if not token:
        return None, "no_value"
    if _INT.fullmatch(token):
        value = int(token)
        if SCORE_MIN <= value <= SCORE_MAX:
            return float(value), None
        return None, "out_of_range"
    if _FLOAT.fullmatch(token):
        return None, "not_an_integer"
    return None, "not_a_number"


def parse_winner(text: str) -> tuple[int | None, str | None]:
    """Pairwise verdict -> (1 for output_1, 2 for output_2, None) and a failure reason."""
    if not text or not text.strip():
        return None, "empty"
    answer = text.strip()
    if answer == PAIR_IDS[0]:
        return 1, None
    if answer == PAIR_IDS[1]:
        return 2, None
    return None, "unparseable"


def label_distribution(
    top_logprobs: Mapping[str, float], labels: Iterable[str]
) -> tuple[dict[str, float], float]:
    """Renormalised probabilities of `labels` among one position's returned logprobs.

    Tokens are matched after stripping whitespace (so "3" and " 3" both count for "3").
    Returns ({label: p}, mass) where mass is the labels' total probability before
    renormalisation; ({}, 0.0) when none of the labels was returned.
    """
    wanted = set(labels)
    raw: dict[str, float] = {}
    for token, logprob in top_logprobs.items():
        key = token.strip()
        if key in wanted and logprob is not None and logprob > -math.inf:
            raw[key] = raw.get(key, 0.0) + math.exp(logprob)
    mass = sum(raw.values())
    if mass <= 0.0:
        return {}, 0.0
    return {k: raw[k] / mass for k in sorted(raw)}, mass


def expected_score(top_logprobs: Mapping[str, float]) -> tuple[float | None, dict[str, float], float]:
    """Expectation of 0..5 under the renormalised digit probabilities: (score, probs, mass)."""
    probs, mass = label_distribution(top_logprobs, SCORE_DIGITS)
    if not probs:
        return None, {}, 0.0
    return sum(int(d) * p for d, p in probs.items()), probs, mass


def score_position(tokens: list[str]) -> int | None:
    """Index of the generated token holding the value of the last "Score:" label, if any.

    Used where a whole verdict was generated with per-token logprobs: the score's
    distribution is read at that position.
    """
    text = "".join(tokens)
    labels = list(SCORE_LABEL.finditer(text))
    if not labels:
        return None
    # first non-space, non-emphasis character after the label
    pos = labels[-1].end()
    while pos < len(text) and text[pos] in " \t*_":
        pos += 1
    if pos >= len(text) or not text[pos].isdigit():
        return None
    offset = 0
    for i, tok in enumerate(tokens):
        if offset + len(tok) > pos:
            return i
        offset += len(tok)
    return None
