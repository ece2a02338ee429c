"""Judging files of rows: a candidates file into judgments.jsonl (the loop's judgment stage and
`selfreward judge score`), answer pairs into comparisons (`selfreward judge compare`), both
through `selfreward.judging.rows.judge_rows` with any `Judge`.

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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfreward import shards
from selfreward.errors import InputError, StageError
from selfreward.judging.protocol import Judge, failure_kind
from selfreward.judging.rows import Judged, judge_rows
from selfreward.progress import NULL_PROGRESS, Progress
from selfreward.schemas import JudgmentRecord
from selfreward.shards import Sharding
from selfreward.storage import ResumableJsonl, read_jsonl, sha256_text


def _record_id(rec: dict[str, Any]) -> str:
    return str(rec["id"])


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


def _by_instruction(items: list[JudgeInput]) -> list[list[JudgeInput]]:
    """The candidates of one instruction are scored in one request (vLLM batches them)."""
    groups: dict[str, list[JudgeInput]] = {}
    for x in items:
        groups.setdefault(x.instruction, []).append(x)
    return list(groups.values())


async def ajudge_candidates(
    candidates_path: str | Path,
    out_path: str | Path,
    judge: Judge,
    progress: Progress = NULL_PROGRESS,
    *,
    samples: int | None = None,
    stage: str = "judgments",
    sharding: Sharding | None = None,
) -> dict[str, Any]:
    """Judge every candidate not yet in `out_path`; returns counts (see module docstring).
    `stage` names the progress task and the error (the loop's judging stages). `sharding`
    (`selfreward.shards`): a shard job judges its prompts' candidates into its shard file; the
    stage's own job merges the shard files into `out_path` first (counted in `from_shards`)."""
    inputs = read_judge_inputs(candidates_path)
    merged = 0
    if sharding is not None and sharding.is_shard:
        inputs = shards.pick(inputs, sharding, lambda x: x.prompt_id)
        out_path = shards.store_file(out_path, sharding, [], _record_id)
    elif sharding is not None:
        merged = shards.merge(out_path, sharding.n, [x.id for x in inputs], _record_id)
    kinds: Counter[str] = Counter()
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

    async def score(group: list[JudgeInput]) -> list[Judged]:
        results = await judge.score(group[0].instruction, [x.response for x in group], samples)
        out = []
        for x, res in zip(group, results, strict=True):
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
            out.append(Judged(x.id, rec.model_dump(mode="json"), res.transient_failure))
            if res.transient_failure is not None:
                counts["backend_errors"] += 1
            else:
                counts["verdicts"] += len(res.verdicts)
                counts["parse_failures"] += res.failures
                counts["unscored"] += int(res.score is None)
                counts["truncated"] += int(res.truncated)
                counts["cached_verdicts"] += res.cached
                kinds.update(failure_kind(v.failure) for v in res.verdicts if v.failure)
        return out

    with ResumableJsonl(out_path, key=_record_id) as out:
        _check_same_judge(out, judge, judge.template.sha256)
        task = progress.task(stage, len(inputs), done=sum(1 for x in inputs if x.id in out))
        report = await judge_rows(
            inputs,
            key=lambda x: x.id,
            judge=score,
            store=out,
            concurrency=max(2, judge.concurrency * 2),
            group=_by_instruction,
            task=task,
            on_result=lambda _: {"failures": counts["parse_failures"], "errors": counts["backend_errors"]},
        )
        task.close()
        written = len(out)
    errors = report.transient
    counts.update(
        already_judged=report.already,
        judged=len(report.written),
        backend_errors=len(errors),
        failure_kinds=dict(kinds),
        judge=judge.name,
        template_sha256=judge.template.sha256,
        mode=judge.mode,
        written=written,
    )
    if merged:
        counts.update(
            judged=counts["judged"] + merged,
            already_judged=counts["already_judged"] - merged,
            from_shards={"shards": sharding.n if sharding else 1, "records": merged},
        )
    if errors:
        raise StageError(
            stage,
            f"{len(errors)} candidate(s) got no verdict because the judge backend failed "
            f"(first: {errors[0].key}: {errors[0].transient}); the {counts['judged']} others are saved "
            f"in {out_path}: run again to judge the rest",
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
    """`ajudge_candidates` in an event loop of its own (the CLI); closes the judge's connections
    when done (the judge stays usable: it opens new ones)."""

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
    """Compare every pair not yet in `out_path` (both orders); returns counts."""
    inputs = read_pair_inputs(pairs_path)
    outcome = {"a": 0, "b": 0, "tie": 0, "failed": 0}

    async def compare(unit: list[PairInput]) -> list[Judged]:
        (x,) = unit
        res = await judge.compare(x.instruction, x.response_a, x.response_b)
        if res.transient_failure is None:
            won = "a" if res.preference > 0.5 else "b" if res.preference < 0.5 else "tie"
            outcome["failed" if res.failure else won] += 1
        return [Judged(x.id, {"id": x.id, **res.model_dump(mode="json")}, res.transient_failure)]

    with ResumableJsonl(out_path, key=lambda r: str(r["id"])) as out:
        _check_same_judge(out, judge, judge.compare_template.sha256)
        task = progress.task("comparisons", len(inputs), done=sum(1 for x in inputs if x.id in out))
        report = await judge_rows(
            inputs,
            key=lambda x: x.id,
            judge=compare,
            store=out,
            concurrency=max(2, judge.concurrency),
            task=task,
        )
        task.close()
        written = len(out)
    errors = report.transient
    counts: dict[str, Any] = {
        "pairs": len(inputs),
        "already_judged": report.already,
        "judged": len(report.written),
        "backend_errors": len(errors),
        "outcome_this_run": outcome,
        "judge": judge.name,
        "mode": judge.mode,
        "written": written,
    }
    if errors:
        raise StageError(
            "compare",
            f"{len(errors)} pair(s) got no verdict because the judge backend failed; "
            f"the {counts['judged']} others are saved in {out_path}: run again to judge the rest",
        )
    return counts
