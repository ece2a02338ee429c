"""Iteration stage `evaluate`: after iteration t trained and published M(t+1).

`selfreward.evaluation.iteration.evaluate_iteration` writes `eval/iter-<t>/`: head-to-head of
M(t+1) against `eval.head2head_against` (M(t) by default) judged by `eval.judge`, and the
reward-modeling agreement of M(t+1) as a judge with the human ranks of the EFT-eval split;
answers, verdicts and scores are resumable. The stage manifest keeps the headline metrics.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from selfreward.stages.stage import Stage, StageContext, StageResult


def _num(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


class EvaluateResult(StageResult):
    model: str
    baseline: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)

    def summary(self) -> str:
        met = self.metrics
        parts = []
        if "wins" in met:
            lo, hi = met.get("win_rate_ci") or (None, None)
            parts.append(
                f"{self.model} vs {self.baseline}: w/t/l={met['wins']}/{met['ties']}/{met['losses']} "
                f"win_rate={_num(met['win_rate'])} [{_num(lo)}, {_num(hi)}]"
            )
        if "rm_pairwise_accuracy" in met:
            parts.append(f"judge vs humans: pairwise_acc={_num(met['rm_pairwise_accuracy'])}")
        for name, by_role in (met.get("judge_bench_accuracy") or {}).items():
            parts.append(f"judge bench {name}: " + " ".join(f"{r}={_num(a)}" for r, a in by_role.items()))
        return "; ".join(parts)


async def run(ctx: StageContext) -> EvaluateResult:
    from selfreward.evaluation.iteration import eval_judge_spec, evaluate_iteration
    from selfreward.judging import make_run_judge

    cfg = ctx.config
    new = await ctx.served(ctx.t + 1)
    against = cfg.eval.head2head_against
    baseline = None
    if against == "previous":
        baseline = await ctx.served(ctx.t)
    elif against in ("m0", "m1"):
        baseline = await ctx.served(int(against[1]))
    judge = make_run_judge(
        eval_judge_spec(cfg),
        cfg,
        policy_url=ctx.url,
        self_model=new,
        redis_url=ctx.redis_url,
        client=ctx.policy,
    )
    rm_judge = None
    if cfg.eval.reward_model or cfg.eval.judge_bench:  # M(t+1) as a judge (EFT eval, judge benchmark)
        rm_judge = make_run_judge(
            f"policy:{new}", cfg, policy_url=ctx.url, redis_url=ctx.redis_url, client=ctx.policy
        )
    teacher_judge = None
    if cfg.eval.judge_bench and cfg.teacher.backend:
        teacher_judge = make_run_judge(
            cfg.teacher.backend, cfg, policy_url=ctx.url, redis_url=ctx.redis_url, client=ctx.policy
        )
    try:
        data = await evaluate_iteration(
            cfg,
            ctx.layout,
            ctx.t,
            new,
            baseline,
            judge,
            ctx.policy,
            ctx.progress,
            judge_name=judge.name,
            rm_judge=rm_judge,
            rm_judge_name=rm_judge.name if rm_judge is not None else None,
            teacher_judge=teacher_judge,
        )
    finally:
        await judge.aclose()
        for extra in (rm_judge, teacher_judge):
            if extra is not None:
                await extra.aclose()
    return EvaluateResult(model=new, baseline=baseline, metrics=data.get("metrics", {}))


STAGE = Stage(
    name="evaluate",
    run=run,
    queue="evaluate",
    result=EvaluateResult,
    description="M(t+1) vs a baseline (win rates) and as a judge vs human ranks",
)
