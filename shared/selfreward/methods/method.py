"""The Method record: how an iteration builds its preference data.

A feedback method (the run config's `variant`) is one module holding one `Method`: the stages
its iterations run (names of `selfreward.stages`), the judge of its judgment stage (None: it
judges nothing), how many candidates the policy writes per prompt and whether the teacher writes
one too, its pair builder, its config rules, and a one-line summary with the paper it follows.
`selfreward.methods` registers them by name.

Pair builders return TRL's prompt/chosen/rejected rows, each with a `kind` (actor,
demonstration, judge, ...), and a report that the pairs stage writes into its manifest beside
`pairs_by_kind` (rows per kind) and `dropped_by_reason`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from selfreward.config import RunConfig

if TYPE_CHECKING:
    from selfreward.stages.stage import StageContext

# the iteration of the original study: sample, judge, pair, train, publish, evaluate
REWARD_STAGES = ("prompts", "candidates", "judgments", "pairs", "train", "publish", "evaluate")

PairsBuilder = Callable[["StageContext"], tuple[list[dict[str, Any]], dict[str, Any]]]


def no_rules(config: RunConfig) -> list[str]:
    return []


@dataclass(frozen=True)
class Method:
    """Everything the loop needs to know about one feedback method (see the module docstring)."""

    name: str
    summary: str  # one line
    paper: str  # who published it, and where
    build_pairs: PairsBuilder
    feedback_judge: Callable[[RunConfig], str | None]
    stages: tuple[str, ...] = REWARD_STAGES
    samples: Callable[[RunConfig], int] = lambda config: config.candidates.n
    teacher_answers: bool = False  # the candidates stage asks the teacher for one answer too
    rules: Callable[[RunConfig], list[str]] = no_rules  # what this method needs of a config
    # the model k whose answers the candidates stage adds (N more per prompt, `anchor: true`,
    # generated once per prompt and cached in the run): temporal's anchored rejection; None: none
    anchor_model: Callable[[RunConfig], int | None] = lambda config: None
    # the config fields (dotted, or whole sections) that are the method's own: runs that differ
    # only in the method and these are comparable (`selfreward compare`)
    config_fields: tuple[str, ...] = ()


def with_kinds(rows: list[dict[str, Any]], report: dict[str, Any]) -> dict[str, Any]:
    """The report with `pairs_by_kind` and `dropped_by_reason` (from its `dropped`)."""
    kinds = Counter(str(r.get("kind")) for r in rows)
    return {
        **report,
        "pairs_by_kind": dict(sorted(kinds.items())),
        "dropped_by_reason": dict(sorted((report.get("dropped") or {}).items())),
    }
