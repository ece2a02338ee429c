"""Pairwise judging of two answers per prompt with `Judge.compare` (both orders), resumable.

Each verdict is one record of a JSONL store keyed by prompt id, a hash of the instruction and
both answers, and the judge: a re-run judges only what is missing, and a changed answer is
judged again. Identical answers are not sent to the judge: they are a tie (0.5).
A comparison whose `failure` is set has no preference (None): it is excluded from the rates
and counted as a failure. Transient failures (the backend failed after its retries:
selfreward.judging.protocol) are not stored, so a re-run tries them again. The loop is
`selfreward.judging.rows.judge_rows`, like every judging of rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfreward.judging.protocol import Judge
from selfreward.judging.rows import Judged, judge_rows
from selfreward.progress import NULL_PROGRESS, Progress
from selfreward.shards import Sharding, store_file
from selfreward.storage import ResumableJsonl, sha256_text


@dataclass(frozen=True)
class PairItem:
    prompt_id: str
    instruction: str
    output_a: str
    output_b: str

    @property
    def identical(self) -> bool:
        return self.output_a.strip() == self.output_b.strip()


def _key(rec: dict[str, Any]) -> str:
    return str(rec["key"])


def verdict_key(item: PairItem, judge_name: str) -> str:
    digest = sha256_text("\0".join((item.instruction, item.output_a, item.output_b)))[:16]
    return f"{item.prompt_id}|{digest}|{judge_name}"


async def judge_pairs(
    judge: Judge,
    items: Sequence[PairItem],
    *,
    judge_name: str,
    store_path: Path,
    progress: Progress = NULL_PROGRESS,
    task_name: str = "judging pairs",
    sharding: Sharding | None = None,
) -> list[dict[str, Any]]:
    """One verdict record per item (same order): preference (1 = A better) or None on failure.
    A shard job (`sharding`) writes its verdicts to its shard file (`selfreward.shards`)."""
    failed = [0]

    async def one(unit: list[PairItem]) -> list[Judged]:
        (it,) = unit
        record: dict[str, Any] = {
            "key": verdict_key(it, judge_name),
            "prompt_id": it.prompt_id,
            "judge": judge_name,
            "identical": it.identical,
        }
        transient = None
        if it.identical:
            record.update(preference=0.5, failure=None)
        else:
            comp = await judge.compare(it.instruction, it.output_a, it.output_b)
            transient = comp.transient_failure
            record.update(
                preference=None if comp.failure else float(comp.preference),
                failure=comp.failure,
                ab=comp.ab.model_dump(mode="json"),
                ba=comp.ba.model_dump(mode="json"),
            )
        failed[0] += bool(record["failure"])
        return [Judged(record["key"], record, transient)]

    path = store_file(store_path, sharding, [verdict_key(it, judge_name) for it in items], _key)
    with ResumableJsonl(path, key=_key) as store:
        keyed = {verdict_key(it, judge_name): it for it in items}
        todo = sum(1 for k in keyed if k not in store)
        failed[0] = sum(1 for r in store.records.values() if r.get("failure"))
        task = progress.task(task_name, len(items), done=len(items) - todo)
        report = await judge_rows(
            list(items),
            key=lambda it: verdict_key(it, judge_name),
            judge=one,
            store=store,
            concurrency=max(2, judge.concurrency * 2),
            task=task,
            on_result=lambda _: {"failures": failed[0]},
        )
        task.close()
    return [report.records[verdict_key(it, judge_name)] for it in items]
