"""Set-up stage `prepare`: the base model M0 made servable, and the seed data (IFT, EFT).

The model spec (`model.base`) is prepared into `cache/models/<content hash>/`
(`selfreward.policy.prepare`), the seed files into `runs/<run>/seed/`
(`selfreward.data.seed`); both are idempotent on their own. With
`data.eft_targets: judge-filtered` the EFT targets come from `data.eft_judge`'s verdicts
(`selfreward.data.eft_judge`), which then needs the policy service when that judge is a
`policy:` model; its verdicts are resumable beside the seed files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfreward.config import RunConfig
from selfreward.stages.stage import Stage, StageContext, StageResult


class PrepareResult(StageResult):
    base_model_dir: str
    base_served_name: str
    seed_dir: str
    seed_counts: dict[str, Any]

    def summary(self) -> str:
        c = self.seed_counts
        return f"seed: ift={c.get('ift')} eft_train={c.get('eft_train')} eft_eval={c.get('eft_eval')}"


def needs_policy(config: RunConfig) -> bool:
    return config.data.eft_targets == "judge-filtered" and (config.data.eft_judge or "").startswith("policy:")


async def run(ctx: StageContext) -> PrepareResult:
    from selfreward.data.seed import aprepare_seed
    from selfreward.policy.prepare import prepare_model

    cfg = ctx.config
    base = prepare_model(
        cfg.model.base,
        ctx.layout.cache_dir,
        chat_template=cfg.model.chat_template,
        progress=ctx.progress,
    )
    judge = None
    if cfg.data.eft_targets == "judge-filtered":
        from selfreward.data.eft_judge import eft_judge_for

        judge = eft_judge_for(
            cfg,
            policy_url=ctx.url,
            redis_url=ctx.redis_url,
            client=ctx.policy if needs_policy(cfg) else None,
        )
    try:
        seed = await aprepare_seed(cfg.data, ctx.layout.seed_dir, ctx.progress, judge=judge)
    finally:
        if judge is not None:
            await judge.aclose()
    return PrepareResult(
        base_model_dir=str(base.resolve()),
        base_served_name=cfg.model.served_name,
        seed_dir=str(ctx.layout.seed_dir.resolve()),
        seed_counts=seed.counts,
    )


def base_model_dir(ctx: StageContext) -> Path:
    """The prepared M0 folder (from this run's prepare stage)."""
    result = STAGE.read_result(ctx.layout, 0)
    if result is None:
        from selfreward.errors import StageError

        raise StageError("prepare", "needs stage 'prepare' of iteration 0, which has not run")
    assert isinstance(result, PrepareResult)
    return Path(result.base_model_dir)


STAGE = Stage(
    name="prepare",
    run=run,
    queue="train",
    result=PrepareResult,
    needs_policy=needs_policy,
    timeout_s=4 * 3600,
    description="M0 made servable; seed data (IFT, EFT) from OASST",
)
