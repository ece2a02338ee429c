"""Iteration stage `meta_judgments` (meta-reward): the model judges its own judgments.

For each prompt, the candidate whose K judgments (the judgment stage's sampled verdicts) vary
most in score (at least two parsed scores, variance above 0; the lowest index wins a tie) is
meta-judged: every two of its parsed judgments in both orders (`selfreward.judging.meta`),
then Elo scores from the battles. One record per meta-judged candidate goes to
`meta_judgments.jsonl` through `selfreward.judging.rows.judge_rows` (resumable; a candidate
whose battles met a backend failure is judged again on the next run). The pairs stage turns
the records into judge pairs. Iterations after `meta.judge_iterations` skip this stage.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

from selfreward.stages.stage import Stage, StageContext, StageResult


class MetaJudgmentsResult(StageResult):
    skipped: str | None = None
    candidates: int | None = None
    battles: int | None = None
    meta_parse_failures: int | None = None

    def summary(self) -> str:
        if self.skipped:
            return self.skipped
        return (
            f"meta-judged={self.candidates} battles={self.battles} parse_failures={self.meta_parse_failures}"
        )


def variance(scores: list[float]) -> float:
    mean = sum(scores) / len(scores)
    return sum((s - mean) ** 2 for s in scores) / len(scores)


def pick_candidates(judgments: list[Any]) -> list[Any]:
    """Per prompt, the judgment record whose parsed verdict scores vary most (see the docstring)."""
    best: dict[str, tuple[float, int, Any]] = {}
    for j in judgments:
        scores = [v.score for v in j.verdicts if v.score is not None]
        if len(scores) < 2:
            continue
        var = variance(scores)
        if var <= 0:
            continue
        key = (var, -j.index)
        if j.prompt_id not in best or key > best[j.prompt_id][:2]:
            best[j.prompt_id] = (var, -j.index, j)
    return [best[p][2] for p in sorted(best)]


async def run(ctx: StageContext) -> MetaJudgmentsResult:
    from selfreward.judging import make_run_judge
    from selfreward.judging.meta import MetaJudge, elo
    from selfreward.judging.rows import Judged, judge_rows
    from selfreward.schemas import CandidateRecord, JudgmentRecord, read_records
    from selfreward.storage import ResumableJsonl

    cfg = ctx.config
    meta = cfg.meta
    if meta.judge_iterations is not None and ctx.t > meta.judge_iterations:
        return MetaJudgmentsResult(skipped=f"judge pairs only in iterations 1..{meta.judge_iterations}")
    candidates = {c.id: c for c in read_records(ctx.file("candidates"), CandidateRecord)}
    picked = pick_candidates(read_records(ctx.file("judgments"), JudgmentRecord))
    judge = make_run_judge(
        "policy:self",
        cfg,
        policy_url=ctx.url,
        self_model=await ctx.served(),
        redis_url=ctx.redis_url,
        client=ctx.policy,
    )
    meta_judge = MetaJudge.over(judge, meta.template, meta.max_tokens, meta.strip_scores)
    failures: Counter[str] = Counter()

    async def judge_one(unit: list[Any]) -> list[Judged]:
        (record,) = unit
        cand = candidates[record.id]
        parsed = [(i, v) for i, v in enumerate(record.verdicts) if v.score is not None]
        texts = [v.text for _, v in parsed]
        battles = [
            await meta_judge.battle(cand.prompt, cand.text, texts, a, b)
            for a, b in itertools.combinations(range(len(texts)), 2)
        ]
        transient = next((b.transient_failure for b in battles if b.transient_failure), None)
        for b in battles:
            for v in (b.ab, b.ba):
                if v.failure and transient is None:
                    failures[v.failure.split(":", 1)[0]] += 1
        row = {
            "id": record.id,
            "prompt_id": record.prompt_id,
            "judge": meta_judge.name,
            "template_sha256": meta_judge.template.sha256,
            "judgments": [{"verdict": i, "text": v.text, "score": v.score} for i, v in parsed],
            "battles": [b.model_dump(mode="json") for b in battles],
            "elo": elo(len(texts), battles),
        }
        return [Judged(record.id, row, transient)]

    task = ctx.progress.task(f"meta-judgments (iter {ctx.t})", len(picked))
    try:
        with ResumableJsonl(ctx.file("meta_judgments"), key=lambda r: str(r["id"])) as store:
            task.update(done=sum(1 for r in picked if r.id in store))
            report = await judge_rows(
                picked,
                key=lambda r: r.id,
                judge=judge_one,
                store=store,
                concurrency=judge.concurrency,
                task=task,
            )
            rows = list(store.records.values())
    finally:
        task.close()
        await judge.aclose()
    if report.transient:
        from selfreward.errors import StageError

        first = report.transient[0]
        raise StageError(
            "meta_judgments",
            f"{len(report.transient)} candidate(s) got no meta-judgment because the judge backend failed "
            f"(first: {first.key}: {first.transient}); the others are saved: run again to judge the rest",
        )
    outcomes = Counter(b["outcome"] for r in rows for b in r["battles"])
    return MetaJudgmentsResult(
        candidates=len(rows),
        battles=sum(outcomes.values()),
        outcomes=dict(sorted(outcomes.items())),
        meta_parse_failures=outcomes.get("failed", 0),
        failure_kinds=dict(sorted(failures.items())),
        prompts_without_candidate=len({c.prompt_id for c in candidates.values()}) - len(picked),
        judge=meta_judge.name,
        template_sha256=meta_judge.template.sha256,
    )


STAGE = Stage(
    name="meta_judgments",
    run=run,
    queue="judge",
    result=MetaJudgmentsResult,
    description="the model compares its own judgments (Meta-Rewarding's meta-judge), Elo per judgment",
)
