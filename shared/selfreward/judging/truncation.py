"""The truncation rule for responses too long for the judge (docs/judge.md).

1. Characters (every backend): a response longer than `judge.max_response_chars` keeps its
   first `max_response_chars` characters, cut back to the last whitespace when one lies in
   the final 10% of that window, followed by TRUNCATION_MARK.
2. Tokens (backends that report their context, i.e. vLLM through /tokenize): when the
   rendered prompt plus the tokens reserved for the verdict exceed the model's context, the
   response(s) are cut further, proportionally to the overflow, by the same rule, until the
   prompt fits (at most a few rounds). A prompt that cannot fit even with empty responses
   is a `context_overflow` failure.

Either cut sets `truncated` on the result. The instruction is never cut.
"""

from __future__ import annotations

TRUNCATION_MARK = "\n[... response truncated by the judge ...]"


def cut_text(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars` characters (+ the mark) by the rule above."""
    if len(text) <= max_chars:
        return text
    keep = text[: max(0, max_chars)]
    space = max(keep.rfind(" "), keep.rfind("\n"), keep.rfind("\t"))
    if space >= int(len(keep) * 0.9):
        keep = keep[:space]
    return keep.rstrip() + TRUNCATION_MARK


def truncate_chars(text: str, max_chars: int) -> tuple[str, bool]:
    cut = cut_text(text, max_chars)
    return cut, cut != text


def shrink_for_overflow(texts: list[str], prompt_chars: int, prompt_tokens: int, budget: int) -> list[str]:
    """Cut `texts` (already possibly truncated) so the prompt loses about the overflowing tokens.

    The overflow in characters is estimated from the prompt's own characters per token,
    with a 10% margin, and taken from the texts in proportion to their lengths.
    """
    overflow = prompt_tokens - budget
    if overflow <= 0:
        return texts
    chars_per_token = max(prompt_chars / max(prompt_tokens, 1), 1.0)
    to_remove = int(overflow * chars_per_token * 1.1) + len(TRUNCATION_MARK) + 1
    lengths = [len(_strip_mark(t)) for t in texts]
    total = sum(lengths)
    if total == 0:
        return texts
    out = []
    for text, length in zip(texts, lengths, strict=True):
        share = int(to_remove * length / total) + 1
        out.append(cut_text(_strip_mark(text), max(0, length - share)) if length else text)
    return out


def _strip_mark(text: str) -> str:
    return text.removesuffix(TRUNCATION_MARK)
