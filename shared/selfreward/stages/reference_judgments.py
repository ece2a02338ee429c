"""Iteration stage `reference_judgments` (cream): the candidates judged again by the previous judge.

CREAM (Wang et al. 2024) measures how far the current judge M(t) and the previous one M(t-1)
agree on the ranking of each prompt's candidates. This stage scores the iteration's
candidates.jsonl with M(t-1) as the judge, with the same judge settings as the judgments stage,
into reference_judgments.jsonl (same record format, resumable record by record). Iteration 1
has no M(t-1) adapter: `cream.first_reference` picks the base model M0 (default) or the teacher
(`teacher.backend`). Both adapters are served by vLLM at once (`policy.max_loras` >= 2).
"""

from __future__ import annotations

from selfreward.stages.judgments import JudgmentsResult, judge_file
from selfreward.stages.stage import Stage, StageContext


async def reference_judge(ctx: StageContext) -> tuple[str, str | None]:
    """(judge spec, the served model policy:self stands for) of iteration ctx.t's previous judge."""
    cfg = ctx.config
    if ctx.t == 1 and cfg.cream.first_reference == "teacher":
        assert cfg.teacher.backend is not None  # the method's rules check it
        return cfg.teacher.backend, None
    return "policy:self", await ctx.served(ctx.t - 1)


async def run(ctx: StageContext) -> JudgmentsResult:
    spec, model = await reference_judge(ctx)
    counts = await judge_file(ctx, spec, self_model=model, output="reference_judgments")
    return JudgmentsResult(**counts, reference_model=model or spec)


STAGE = Stage(
    name="reference_judgments",
    run=run,
    queue="judge",
    result=JudgmentsResult,
    shardable=True,
    description="the candidates judged again by the previous judge M(t-1) (cream's consistency)",
)
