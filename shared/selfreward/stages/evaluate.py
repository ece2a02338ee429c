"""Iteration stage `evaluate`: after iteration t trained and published M(t+1).

`selfreward.evaluation.iteration.evaluate_iteration` writes `eval/iter-<t>/`: head-to-head of
M(t+1) against `eval.head2head_against` (M(t) by default) and `eval.fixed_baseline` (M1 by
default) judged by the run's pinned evaluator (`selfreward.evaluation.evaluator`), and the
reward-modeling agreement of M(t+1) as a judge with the human ranks of the EFT-eval split;
answers, verdicts and scores are resumable. The stage manifest keeps the headline metrics.

Sharded (distributed mode, `services.judge_shards` > 1): n shard jobs on the evaluate queue
each answer, judge and score their part of the prompts (every n-th prompt, EFT-eval record and
judge-bench item) into shard files; the stage's own job merges them, does what is missing and
writes the report (`selfreward.shards`).
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
    fixed_baseline: str | None = None
    evaluator: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    verdicts: list[str] = Field(default_factory=list)  # the summary rule's sentence per comparison

    def summary(self) -> str:
        met = self.metrics
        parts = []
        if "wins" in met:
            lo, hi = met.get("win_rate_ci") or (None, None)
            parts.append(
                f"{self.model} vs {self.baseline}: w/t/l={met['wins']}/{met['ties']}/{met['losses']} "
                f"win_rate={_num(met['win_rate'])} [{_num(lo)}, {_num(hi)}]"
            )
        if "fixed_wins" in met and self.fixed_baseline != self.baseline:
            lo, hi = met.get("fixed_win_rate_ci") or (None, None)
            parts.append(
                f"vs fixed {self.fixed_baseline}: w/t/l={met['fixed_wins']}/{met['fixed_ties']}/{met['fixed_losses']} "
                f"win_rate={_num(met['fixed_win_rate'])} [{_num(lo)}, {_num(hi)}]"
            )
        if self.evaluator:
            parts.append(
                f"evaluator {self.evaluator}" + (" (SELF-EVALUATION)" if met.get("self_evaluation") else "")
            )
        if met.get("evidence") is False:
            parts.append("no evidence of a difference")
        if "rm_pairwise_accuracy" in met:
            parts.append(f"judge vs humans: pairwise_acc={_num(met['rm_pairwise_accuracy'])}")
        for name, by_role in (met.get("judge_bench_accuracy") or {}).items():
            parts.append(f"judge bench {name}: " + " ".join(f"{r}={_num(a)}" for r, a in by_role.items()))
        return "; ".join(parts)


async def run(ctx: StageContext) -> EvaluateResult:
    from selfreward.evaluation.evaluator import resolve_evaluator
    from selfreward.evaluation.iteration import evaluate_iteration
    from selfreward.judging import make_run_judge
    from selfreward.shards import Sharding
    from selfreward.stages.prepare import base_model_dir

    cfg = ctx.config
    new = await ctx.served(ctx.t + 1)
    against = cfg.eval.head2head_against
    baseline = None
    if against == "previous":
        baseline = await ctx.served(ctx.t)
    elif against in ("m0", "m1"):
        baseline = await ctx.served(int(against[1]))
    fixed = None
    if cfg.eval.fixed_baseline != "none":
        fixed = await ctx.served(int(cfg.eval.fixed_baseline[1]))
    evaluator = await resolve_evaluator(cfg, ctx.layout, ctx.t, ctx.served, str(base_model_dir(ctx)))
    judge = make_run_judge(
        evaluator.judge or "policy:self",
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
            fixed_baseline_model=fixed,
            evaluator=evaluator,
            sharding=Sharding.of(ctx.shard, cfg.services.judge_shards),
        )
    finally:
        await judge.aclose()
        for extra in (rm_judge, teacher_judge):
            if extra is not None:
                await extra.aclose()
    if "shard" in data:  # a shard job's counts: the stage's own job writes the report
        return EvaluateResult(model=new, baseline=baseline, fixed_baseline=fixed, metrics=data)
    return EvaluateResult(
        model=new,
        baseline=baseline,
        fixed_baseline=fixed,
        evaluator=data["metrics"].get("evaluator"),
        metrics=data.get("metrics", {}),
        verdicts=[h["summary"]["text"] for h in (data.get("head2head"), data.get("head2head_fixed")) if h],
    )


STAGE = Stage(
    name="evaluate",
    run=run,
    queue="evaluate",
    result=EvaluateResult,
    shardable=True,
    description="M(t+1) vs a baseline (win rates) and as a judge vs human ranks",
)
