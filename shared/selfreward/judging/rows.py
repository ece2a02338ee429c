"""Resumable judging of rows: the one loop every file of judgments is written by.

`judge_rows(items, key=..., judge=..., store=...)` judges every item whose key is not in the
store yet, `concurrency` units at a time, and appends each result record as soon as it is in
(`ResumableJsonl`: fsynced lines, torn-line repair), so a crash loses at most the units in
flight and a re-run judges only what is missing. A unit is one item, or a group of items
(`group=`: e.g. the candidates of one prompt, scored in one request).

`judge(unit)` returns one `Judged` per item: its record, and whether it is transient (a
backend failure, `selfreward.judging.protocol.is_transient`): a transient record is returned
to the caller but not written, so the next run judges it again. An exception raised by
`judge` stops the loop (the units in flight are cancelled; what was written stays).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from selfreward.progress import Task
from selfreward.storage import ResumableJsonl

T = TypeVar("T")


@dataclass(frozen=True)
class Judged:
    """The outcome for one item: the record to write (or, when transient, not to write)."""

    key: str
    record: dict[str, Any]
    transient: str | None = None  # the transient failure; None: write the record


@dataclass
class RowsReport(Generic[T]):
    already: int = 0  # items found in the store
    new: list[Judged] = field(default_factory=list)  # this run's outcomes, written or not
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # every item's record by key

    @property
    def written(self) -> list[Judged]:
        return [j for j in self.new if j.transient is None]

    @property
    def transient(self) -> list[Judged]:
        return [j for j in self.new if j.transient is not None]


def singletons(items: list[T]) -> list[list[T]]:
    return [[x] for x in items]


async def judge_rows(
    items: Sequence[T],
    *,
    key: Callable[[T], str],
    judge: Callable[[list[T]], Awaitable[list[Judged]]],
    store: ResumableJsonl,
    concurrency: int,
    group: Callable[[list[T]], list[list[T]]] = singletons,
    task: Task | None = None,
    on_result: Callable[[Judged], dict[str, Any]] | None = None,
) -> RowsReport[T]:
    """Judge what `store` lacks (see the module docstring); `task` advances per item, with the
    fields `on_result` returns for each outcome."""
    report: RowsReport[T] = RowsReport()
    todo = [x for x in items if key(x) not in store]
    report.already = len(items) - len(todo)
    semaphore = asyncio.Semaphore(max(1, concurrency))

    async def one(unit: list[T]) -> None:
        async with semaphore:
            outcomes = await judge(unit)
        fields: dict[str, Any] = {}
        for judged in outcomes:
            if judged.transient is None:
                store.append(judged.record)
            report.new.append(judged)
            if on_result is not None:
                fields = on_result(judged)
        if task is not None:
            task.advance(len(unit), **fields)

    try:
        async with asyncio.TaskGroup() as tasks:
            for unit in group(todo):
                tasks.create_task(one(unit))
    except ExceptionGroup as errors:
        raise errors.exceptions[0] from None
    report.records = {**store.records, **{j.key: j.record for j in report.transient}}
    return report
