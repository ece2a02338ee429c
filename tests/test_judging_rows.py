"""The one resumable row-judging loop (selfreward.judging.rows) and the failure rule it applies."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from selfreward.judging.protocol import failure_kind, is_cacheable, is_transient
from selfreward.judging.rows import Judged, judge_rows
from selfreward.progress import Progress, ProgressEvent
from selfreward.storage import ResumableJsonl, load_jsonl


def test_the_failure_rule() -> None:
    assert failure_kind("backend_error: HTTP 503: busy") == "backend_error"
    assert is_transient("backend_error: HTTP 503: busy") and not is_transient("unparseable: no label")
    assert not is_transient(None) and not is_transient("context_overflow: too long")
    # context overflow is the judge's answer for this context: written, but never cached
    assert not is_cacheable("context_overflow: too long") and not is_cacheable("backend_error: x")
    assert is_cacheable(None) and is_cacheable("unparseable: no label") and is_cacheable("blocked: SAFETY")


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_rows_are_written_as_judged_and_transients_are_retried(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    calls: list[list[str]] = []
    flaky = {"b"}

    async def judge(unit: list[str]) -> list[Judged]:
        calls.append(unit)
        await asyncio.sleep(0)
        return [
            Judged(x, {"id": x, "v": x.upper()}, "backend_error: down" if x in flaky else None) for x in unit
        ]

    events: list[ProgressEvent] = []

    async def go() -> object:
        with ResumableJsonl(path, key=lambda r: r["id"]) as store:
            task = Progress(events.append).task("rows", 4)
            return await judge_rows(
                ["a", "b", "c", "d"], key=lambda x: x, judge=judge, store=store, concurrency=2, task=task
            )

    report = run(go())
    assert sorted(r["id"] for r in load_jsonl(path)) == ["a", "c", "d"]  # b failed for a backend reason
    assert [j.key for j in report.transient] == ["b"] and len(report.written) == 3  # type: ignore[attr-defined]
    assert report.records["b"] == {"id": "b", "v": "B"}  # type: ignore[attr-defined]  # returned, not written
    assert events[-1].done == 4
    # the next run judges only what is missing
    flaky.clear()
    calls.clear()
    report = run(go())
    assert calls == [["b"]] and report.already == 3  # type: ignore[attr-defined]
    assert sorted(r["id"] for r in load_jsonl(path)) == ["a", "b", "c", "d"]


def test_groups_share_one_call_and_concurrency_is_bounded(tmp_path: Path) -> None:
    in_flight = peak = 0
    units: list[list[int]] = []

    async def judge(unit: list[int]) -> list[Judged]:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        units.append(unit)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return [Judged(str(x), {"id": str(x)}) for x in unit]

    def by_parity(items: list[int]) -> list[list[int]]:
        return [[x for x in items if x % 2 == 0], [x for x in items if x % 2], *[[x] for x in (100, 101)]]

    async def go() -> None:
        with ResumableJsonl(tmp_path / "g.jsonl", key=lambda r: r["id"]) as store:
            await judge_rows(
                list(range(10)),
                key=str,
                judge=judge,
                store=store,
                concurrency=2,
                group=lambda xs: by_parity(xs),
            )

    run(go())
    assert sorted(map(tuple, units))[:2] == [(0, 2, 4, 6, 8), (1, 3, 5, 7, 9)] and peak == 2


def test_an_exception_stops_the_loop_and_keeps_what_was_written(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"

    async def judge(unit: list[int]) -> list[Judged]:
        (x,) = unit
        if x >= 3:  # gone for good from the fourth call on
            raise RuntimeError("judge went away")
        return [Judged(str(x), {"id": str(x)})]

    async def go() -> None:
        with ResumableJsonl(path, key=lambda r: r["id"]) as store:
            await judge_rows(list(range(6)), key=str, judge=judge, store=store, concurrency=1)

    with pytest.raises(RuntimeError, match="went away"):
        run(go())
    assert [r["id"] for r in load_jsonl(path)] == ["0", "1", "2"]
