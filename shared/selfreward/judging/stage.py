"""The loop's judgment stage (and the CLI's): judge a candidates file into judgments.jsonl.

Input rows are `CandidateRecord`s (candidates.jsonl) or plain rows
{"instruction" | "prompt": ..., "response" | "text": ..., optional "id", "prompt_id", "index"}.
A plain row without an id gets "sha-<16 hex>" of its instruction and response.

Output: one `JudgmentRecord` per candidate, appended as soon as its verdicts are in
(`ResumableJsonl`): a resumed run judges only the candidates not written yet. Unparseable
verdicts are kept in the record (they are the judge's answer); a candidate whose verdicts
failed for a backend reason is not written, so the next run retries it, and the stage ends
with a `StageError` counting them after saving everything else. A judgments file written by
another judge (spec, template or mode) is refused rather than mixed.

Pairwise files (`compare_rows`): rows {"instruction" | "prompt", "response_a" | "output_1",
"response_b" | "output_2", optional "id"} -> one record per row with the preference and both
orders' verdicts, resumable the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from selfreward.errors import InputError, StageError
from selfreward.judging.judge import Judge, failure_kind
from selfreward.progress import NULL_PROGRESS, Progress
from selfreward.schemas import JudgmentRecord
from selfreward.storage import ResumableJsonl, read_jsonl, sha256_text

T = TypeVar("T")


@dataclass(frozen=True)
class JudgeInput:
    id: str
    prompt_id: str
    index: int
    instruction: str
    response: str


def _text_field(row: dict[str, Any], names: tuple[str, ...], where: str) -> str:
    for name in names:
        if name in row:
            value = row[name]
            if not isinstance(value, str):
                raise InputError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
            return value
    raise InputError(f"{where}: missing field {' or '.join(repr(n) for n in names)}")


def read_judge_inputs(path: str | Path) -> list[JudgeInput]:
    """Candidates to judge, in file order; errors name file:line and the field."""
    inputs: list[JudgeInput] = []
    seen: dict[str, int] = {}
    per_prompt: dict[str, int] = {}
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        instruction = _text_field(row, ("instruction", "prompt"), where)
        response = _text_field(row, ("response", "text"), where)
        explicit = row.get("id")
        rid = (
            str(explicit) if explicit is not None else "sha-" + sha256_text(f"{instruction}\0{response}")[:16]
        )
        prompt_id = str(row.get("prompt_id") or "p-" + sha256_text(instruction)[:12])
        index = row.get("index")
        if index is None:
            index = per_prompt.get(prompt_id, 0)
        elif not isinstance(index, int) or isinstance(index, bool):
            raise InputError(f"{where}: field 'index' must be an integer, got {index!r}")
        per_prompt[prompt_id] = max(per_prompt.get(prompt_id, 0), index + 1)
        if rid in seen:
            if explicit is not None:
                raise InputError(f"{where}: duplicate id {rid!r} (first on line {seen[rid]})")
            continue  # the same instruction and response twice: one judgment
        seen[rid] = lineno
        inputs.append(JudgeInput(rid, prompt_id, index, instruction, response))
    return inputs


def _check_same_judge(out: ResumableJsonl, judge: Judge, template_sha256: str) -> None:
    for rec in out.records.values():
        mine = (judge.name, template_sha256, judge.mode)
        theirs = (rec.get("judge"), rec.get("template_sha256"), rec.get("mode"))
        if theirs != mine:
            raise InputError(
                f"{out.path}: record {rec.get('id')!r} was judged by {theirs[0]} (template "
                f"{str(theirs[1])[:12]}, mode {theirs[2]}), this run judges with {mine[0]} (template "
                f"{mine[1][:12]}, mode {mine[2]}): write to another file or remove it"
            )


async def _bounded(limit: int, jobs: list[Callable[[], Awaitable[T]]]) -> None:
    semaphore = asyncio.Semaphore(limit)

    async def run(job: Callable[[], Awaitable[T]]) -> None:
        async with semaphore:
            await job()

    async with asyncio.TaskGroup() as group:
        for job in jobs:
            group.create_task(run(job))


async def ajudge_candidates(
    candidates_path: str | Path,
    out_path: str | Path,
    judge: Judge,
    progress: Progress = NULL_PROGRESS,
    *,
    samples: int | None = None,
) -> dict[str, Any]:
    """Judge every candidate not yet in `out_path`; returns counts (see module docstring)."""
    inputs = read_judge_inputs(candidates_path)
    out = ResumableJsonl(out_path, key=lambda r: str(r["id"]))
    counts: dict[str, Any] = {
        "candidates": len(inputs),
        "already_judged": 0,
        "judged": 0,
        "backend_errors": 0,
        "verdicts": 0,
        "parse_failures": 0,
        "unscored": 0,
        "truncated": 0,
        "cached_verdicts": 0,
        "failure_kinds": {},
    }
    first_error: list[str] = []
    try:
        _check_same_judge(out, judge, judge.template.sha256)
        todo = [x for x in inputs if x.id not in out]
        counts["already_judged"] = len(inputs) - len(todo)
        task = progress.task("judgments", len(inputs), done=counts["already_judged"])
        groups: dict[str, list[JudgeInput]] = {}
        for x in todo:
            groups.setdefault(x.instruction, []).append(x)

        async def judge_group(items: list[JudgeInput]) -> None:
            results = await judge.score(items[0].instruction, [x.response for x in items], samples)
            for x, res in zip(items, results, strict=True):
                errors = [
                    v.failure
                    for v in res.verdicts
                    if v.failure and failure_kind(v.failure) == "backend_error"
                ]
                if errors:
                    counts["backend_errors"] += 1
                    if not first_error:
                        first_error.append(f"{x.id}: {errors[0]}")
                    continue
                rec = JudgmentRecord(
                    id=x.id,
                    prompt_id=x.prompt_id,
                    index=x.index,
                    judge=res.judge,
                    template_sha256=res.template_sha256,
                    mode=res.mode,
                    verdicts=res.verdicts,
                    score=res.score,
                    failures=res.failures,
                    truncated=res.truncated,
                )
                out.append(rec.model_dump(mode="json"))
                counts["judged"] += 1
                counts["verdicts"] += len(res.verdicts)
                counts["parse_failures"] += res.failures
                counts["unscored"] += int(res.score is None)
                counts["truncated"] += int(res.truncated)
                counts["cached_verdicts"] += res.cached
                for v in res.verdicts:
                    if v.failure:
                        kind = failure_kind(v.failure)
                        counts["failure_kinds"][kind] = counts["failure_kinds"].get(kind, 0) + 1
            task.advance(len(items), failures=counts["parse_failures"], errors=counts["backend_errors"])

        window = max(2, judge.config.concurrency * 2)
        jobs = [lambda items=items: judge_group(items) for items in groups.values()]
        try:
            await _bounded(window, jobs)
        except ExceptionGroup as group_error:
            raise group_error.exceptions[0] from None
        task.close()
    finally:
        out.close()
    counts.update(judge=judge.name, template_sha256=judge.template.sha256, mode=judge.mode, written=len(out))
    if counts["backend_errors"]:
        raise StageError(
            "judgments",
            f"{counts['backend_errors']} candidate(s) got no verdict because the judge backend failed "
            f"(first: {first_error[0]}); the {counts['judged']} others are saved in {out_path}: "
            "run again to judge the rest",
        )
    return counts


def judge_candidates(
    candidates_path: str | Path,
    out_path: str | Path,
    judge: Judge,
    progress: Progress = NULL_PROGRESS,
    *,
    samples: int | None = None,
) -> dict[str, Any]:
    """Synchronous `ajudge_candidates` (CLI commands, RQ jobs).

    Closes the judge's connections when done; the judge stays usable (it reconnects).
    """

    async def run() -> dict[str, Any]:
        try:
            return await ajudge_candidates(candidates_path, out_path, judge, progress, samples=samples)
        finally:
            await judge.aclose()

    return asyncio.run(run())


# ---------------------------------------------------------------- pairwise files


@dataclass(frozen=True)
class PairInput:
    id: str
    instruction: str
    response_a: str
    response_b: str


def read_pair_inputs(path: str | Path) -> list[PairInput]:
    inputs: list[PairInput] = []
    seen: dict[str, int] = {}
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        instruction = _text_field(row, ("instruction", "prompt"), where)
        a = _text_field(row, ("response_a", "output_1"), where)
        b = _text_field(row, ("response_b", "output_2"), where)
        explicit = row.get("id")
        rid = str(explicit) if explicit is not None else "sha-" + sha256_text(f"{instruction}\0{a}\0{b}")[:16]
        if rid in seen:
            if explicit is not None:
                raise InputError(f"{where}: duplicate id {rid!r} (first on line {seen[rid]})")
            continue
        seen[rid] = lineno
        inputs.append(PairInput(rid, instruction, a, b))
    return inputs


async def acompare_rows(
    pairs_path: str | Path, out_path: str | Path, judge: Judge, progress: Progress = NULL_PROGRESS
) -> dict[str, Any]:
    inputs = read_pair_inputs(pairs_path)
    out = ResumableJsonl(out_path, key=lambda r: str(r["id"]))
    counts: dict[str, Any] = {"pairs": len(inputs), "already_judged": 0, "judged": 0, "backend_errors": 0}
    outcome = {"a": 0, "b": 0, "tie": 0, "failed": 0}
    try:
        _check_same_judge(out, judge, judge.compare_template.sha256)
        todo = [x for x in inputs if x.id not in out]
        counts["already_judged"] = len(inputs) - len(todo)
        task = progress.task("comparisons", len(inputs), done=counts["already_judged"])

        async def one(x: PairInput) -> None:
            res = await judge.compare(x.instruction, x.response_a, x.response_b)
            if res.failure and "backend_error" in res.failure:
                counts["backend_errors"] += 1
            else:
                record = {"id": x.id, **res.model_dump(mode="json")}
                out.append(record)
                counts["judged"] += 1
                key = (
                    "failed"
                    if res.failure
                    else "a"
                    if res.preference > 0.5
                    else "b"
                    if res.preference < 0.5
                    else "tie"
                )
                outcome[key] += 1
            task.advance(1)

        try:
            await _bounded(max(2, judge.config.concurrency), [lambda x=x: one(x) for x in todo])
        except ExceptionGroup as group_error:
            raise group_error.exceptions[0] from None
        task.close()
    finally:
        out.close()
    counts.update(outcome_this_run=outcome, judge=judge.name, mode=judge.mode, written=len(out))
    if counts["backend_errors"]:
        raise StageError(
            "compare",
            f"{counts['backend_errors']} pair(s) got no verdict because the judge backend failed; "
            f"the {counts['judged']} others are saved in {out_path}: run again to judge the rest",
        )
    return counts
