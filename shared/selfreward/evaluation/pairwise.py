"""Pairwise judging of two answers per prompt with `Judge.compare` (both orders), resumable.

Each verdict is one record of a JSONL store keyed by prompt id, a hash of the instruction and
both answers, and the judge: a re-run judges only what is missing, and a changed answer is
judged again. Identical answers are not sent to the judge: they are a tie (0.5).
A comparison whose `failure` is set has no preference (None): it is excluded from the rates
and counted as a failure. Transient failures (the backend failed after its retries, or the
context overflowed) are not stored, so a re-run tries them again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from selfreward.evaluation.answers import jsonable
from selfreward.progress import NULL_PROGRESS, Progress
from selfreward.storage import ResumableJsonl, sha256_text


class PairJudge(Protocol):
    async def compare(self, instruction: str, response_a: str, response_b: str) -> Any: ...


@dataclass(frozen=True)
class PairItem:
    prompt_id: str
    instruction: str
    output_a: str
    output_b: str

    @property
    def identical(self) -> bool:
        return self.output_a.strip() == self.output_b.strip()


TRANSIENT_FAILURES = ("backend_error", "context_overflow")


def is_transient(failure: str | None) -> bool:
    """A failure that says nothing about the answers (selfreward.judging's transient kinds)."""
    return failure is not None and any(kind in failure for kind in TRANSIENT_FAILURES)


def verdict_key(item: PairItem, judge_name: str) -> str:
    digest = sha256_text("\0".join((item.instruction, item.output_a, item.output_b)))[:16]
    return f"{item.prompt_id}|{digest}|{judge_name}"


async def judge_pairs(
    judge: PairJudge,
    items: Sequence[PairItem],
    *,
    judge_name: str,
    store_path: Path,
    progress: Progress = NULL_PROGRESS,
    task_name: str = "judging pairs",
) -> list[dict[str, Any]]:
    """One verdict record per item (same order): preference (1 = A better) or None on failure."""
    transient: dict[str, dict[str, Any]] = {}
    with ResumableJsonl(store_path, key=lambda r: str(r["key"])) as store:
        todo = [it for it in items if verdict_key(it, judge_name) not in store]
        task = progress.task(task_name, len(items), done=len(items) - len(todo))
        failed = [sum(1 for r in store.records.values() if r.get("failure"))]

        async def one(it: PairItem) -> None:
            record: dict[str, Any] = {
                "key": verdict_key(it, judge_name),
                "prompt_id": it.prompt_id,
                "judge": judge_name,
                "identical": it.identical,
            }
            if it.identical:
                record.update(preference=0.5, failure=None)
            else:
                comp = await judge.compare(it.instruction, it.output_a, it.output_b)
                failure = getattr(comp, "failure", None)
                record.update(
                    preference=None if failure else float(comp.preference),
                    failure=failure,
                    ab=jsonable(getattr(comp, "ab", None)),
                    ba=jsonable(getattr(comp, "ba", None)),
                )
            if is_transient(record["failure"]):
                transient[record["key"]] = record
            else:
                store.append(record)
            failed[0] += bool(record["failure"])
            task.advance(1, failures=failed[0])

        await asyncio.gather(*(one(it) for it in todo))
        task.close()
        done = {**store.records, **transient}
        return [done[verdict_key(it, judge_name)] for it in items]
