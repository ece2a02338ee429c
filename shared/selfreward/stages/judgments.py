"""Iteration stage `judgments`: every candidate scored by the iteration's judge.

The judge is the method's feedback judge (`RunConfig.feedback_judge`: M(t) itself for
self-reward, the teacher for teacher-reward), in this process (`selfreward.judging`) or through
the judge service when `services.judge_url` is set. `selfreward.judging.files.ajudge_candidates`
writes judgments.jsonl record by record: a resumed stage judges only what is missing; a
candidate whose verdicts failed for a backend reason is not written, so a re-run retries it.
A method without a judge (teacher-demo) has the stage record that and write nothing.
"""

from __future__ import annotations

import os
from typing import Any

from selfreward.stages.stage import Stage, StageContext, StageResult


class JudgmentsResult(StageResult):
    skipped: str | None = None
    judged: int | None = None
    parse_failures: int | None = None
    judge: str | None = None

    def summary(self) -> str:
        if self.skipped:
            return self.skipped
        return f"judged={self.judged} parse_failures={self.parse_failures} by {self.judge}"


async def judge_file(
    ctx: StageContext,
    spec: str,
    *,
    self_model: str | None,
    source: str = "candidates",
    output: str = "judgments",
) -> dict[str, Any]:
    """Judge the iteration's `source` file into its `output` file with judge `spec` (policy:self
    = `self_model`), in this process or through the judge service (`services.judge_url`);
    resumable record by record (`selfreward.judging.files.ajudge_candidates`). The one way the
    loop's judging stages (judgments, reference_judgments, future_judgments) judge a file.

    Sharded (distributed mode, `services.judge_shards` > 1): a shard job (`ctx.shard` = (i, n))
    judges shard i into its own file; the stage's own job then merges the shard files in the
    candidates' order (`selfreward.shards`) and judges whatever is missing."""
    cfg = ctx.config
    from selfreward.judging.files import ajudge_candidates
    from selfreward.shards import Sharding

    judge: Any
    if cfg.services.judge_url:
        from selfreward.judging.remote import RemoteJudge

        judge = RemoteJudge(
            cfg.services.judge_url,
            spec,
            cfg.judge,
            self_model=self_model,
            # the judge service's bearer token, shared by the deployment's services
            api_token=os.environ.get("SELFREWARD_API_TOKEN") or None,
        )
    else:
        from selfreward.judging import make_run_judge

        judge = make_run_judge(
            spec,
            cfg,
            policy_url=ctx.url,
            self_model=self_model,
            redis_url=ctx.redis_url,
            client=ctx.policy,
        )
    try:
        return await ajudge_candidates(
            ctx.file(source),
            ctx.file(output),
            judge,
            ctx.progress,
            stage=output,
            sharding=Sharding.of(ctx.shard, cfg.services.judge_shards),
        )
    finally:
        await judge.aclose()


async def run(ctx: StageContext) -> JudgmentsResult:
    cfg = ctx.config
    spec = cfg.feedback_judge()
    if spec is None:
        return JudgmentsResult(skipped=f"{cfg.variant} pairs need no judge")
    # M(t)'s served name only where the judge is M(t) (a teacher judges without the policy)
    model = await ctx.served() if spec.startswith("policy:self") else None
    return JudgmentsResult(**await judge_file(ctx, spec, self_model=model))


STAGE = Stage(
    name="judgments",
    run=run,
    queue="judge",
    result=JudgmentsResult,
    shardable=True,
    description="K verdicts per candidate from the feedback judge",
)
