"""Held-out evaluation prompts: the evaluation prompts checked against what the run trained on.

The training prompts of iteration t's evaluation are the seed IFT prompts (`seed/ift.jsonl`,
SFT's data) and every prompt of iterations 1..t (`iter-<k>/prompts.jsonl`: self-instructed,
or from a prompt file). An evaluation prompt is contaminated when it is an exact duplicate of
one (after normalisation: lower-cased word tokens) or a near duplicate (ROUGE-L F >= the
threshold, `prompts.dedup_threshold`: the rule the prompts stage applies to its own prompts,
`selfreward.dedup`). With `eval.contamination: drop` (default) they are removed from the
evaluation; with `report` they are kept; both count them in every report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from selfreward.dedup import NearDuplicateIndex, normalise
from selfreward.evaluation.prompt_sets import EvalPrompt
from selfreward.storage import RunLayout, read_jsonl


def training_prompts(layout: RunLayout, t: int) -> dict[str, list[str]]:
    """The prompts the run trained on up to iteration t, by source file."""
    out: dict[str, list[str]] = {}
    ift = layout.seed_dir / "ift.jsonl"
    if ift.is_file():
        out["seed/ift.jsonl"] = [str(r.get("prompt", "")) for _, r in read_jsonl(ift)]
    for k in range(1, t + 1):
        path = layout.stage_file(k, "prompts")
        if path.is_file():
            out[f"iter-{k}/prompts.jsonl"] = [str(r.get("prompt", "")) for _, r in read_jsonl(path)]
    return out


@dataclass
class Contamination:
    checked: int
    action: str  # drop | report
    threshold: float
    training_prompts: dict[str, int]  # per source, how many were checked against
    exact: list[dict[str, Any]] = field(default_factory=list)  # {"id", "source"}
    near: list[dict[str, Any]] = field(default_factory=list)  # {"id", "source", "rouge_l"}

    @property
    def ids(self) -> set[str]:
        return {x["id"] for x in (*self.exact, *self.near)}

    def to_json(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "action": self.action,
            "threshold": self.threshold,
            "training_prompts": self.training_prompts,
            "exact_duplicates": len(self.exact),
            "near_duplicates": len(self.near),
            "removed": len(self.ids) if self.action == "drop" else 0,
            "examples": [*self.exact, *self.near][:20],
        }


def check_contamination(
    prompts: Sequence[EvalPrompt], training: dict[str, list[str]], threshold: float, action: str = "drop"
) -> tuple[list[EvalPrompt], Contamination]:
    """(the prompts to evaluate on, the counts); see the module docstring."""
    exact_index: dict[str, str] = {}
    near_index: list[tuple[str, NearDuplicateIndex]] = []
    for source, texts in training.items():
        index = NearDuplicateIndex(threshold)
        for text in texts:
            exact_index.setdefault(normalise(text), source)
            index.add(text)
        near_index.append((source, index))
    report = Contamination(len(prompts), action, threshold, {s: len(v) for s, v in training.items()})
    for p in prompts:
        source = exact_index.get(normalise(p.instruction))
        if source is not None:
            report.exact.append({"id": p.id, "source": source})
            continue
        best = (0.0, "")
        for src, index in near_index:
            reason, score = index.check(p.instruction)
            if score > best[0]:
                best = (score, src)
            if reason is not None:
                break
        if best[0] >= threshold:
            report.near.append({"id": p.id, "source": best[1], "rouge_l": round(best[0], 4)})
    flagged = report.ids
    kept = [p for p in prompts if p.id not in flagged] if action == "drop" else list(prompts)
    return kept, report
