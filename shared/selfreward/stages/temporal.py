"""The stages of the temporal method (`selfreward.methods.temporal`), between judgments and pairs.

- `anchored_pairs`: M(t)'s best answer against the anchor's worst (or M(t)'s worst), written as
  anchored_pairs.jsonl (the pairs stage's format and report);
- `future_train`: the temporary future model M_f = DPO(M(t)) on the anchored pairs, written as
  models/m<t+1>-future/ (the train stage's recipe, resumable the same way);
- `future_candidates`: M_f served (published with its fingerprint verified, as every adapter),
  then N answers of M_f to each paired prompt, future_candidates.jsonl (resumable per record);
- `future_judgments`: M(t) judges M_f's answers (same judge and settings as the judgments
  stage), future_judgments.jsonl.
The final pairs stage then builds the future-guided pairs.
"""

from __future__ import annotations

from selfreward.errors import EmptyResultError
from selfreward.methods.temporal import anchored_pairs_of, future_model
from selfreward.schemas import PromptRecord, read_records
from selfreward.stages.candidates import CandidatesResult, generate_candidates
from selfreward.stages.judgments import JudgmentsResult, judge_file
from selfreward.stages.pairs import pairs_stage
from selfreward.stages.stage import Stage, StageContext
from selfreward.stages.train import dpo_stage
from selfreward.storage import load_jsonl

ANCHORED_PAIRS = pairs_stage(
    "anchored_pairs",
    anchored_pairs_of,
    "temporal: M(t)'s best answer against the anchor's worst (anchored rejection)",
)

FUTURE_TRAIN = dpo_stage(
    "future_train",
    "anchored_pairs",
    future_model,
    "temporal: the future model M_f = DPO(M(t)) on the anchored pairs",
)


async def future_candidates(ctx: StageContext) -> CandidatesResult:
    from selfreward.policy.pool import publish_to_policy
    from selfreward.policy.publish import tolerance_for

    cfg = ctx.config
    name = future_model(ctx.t)
    record = await publish_to_policy(
        cfg.services,
        ctx.layout.model_dir(name),
        client=ctx.policy,
        name=name,
        parent=await ctx.served(),
        tol=tolerance_for(cfg.policy),
    )
    paired = {r["prompt_id"] for r in load_jsonl(ctx.file("anchored_pairs"))}
    prompts = [p for p in read_records(ctx.file("prompts"), PromptRecord) if p.id in paired]
    if not prompts:
        raise EmptyResultError(f"iteration {ctx.t}: no anchored pair, so no prompt for the future model")
    counts = await generate_candidates(
        ctx.policy,
        record["served_name"],
        prompts,
        cfg.candidates,
        ctx.file("future_candidates"),
        samples=cfg.candidates.n,
        run_seed=cfg.seed,
        t=ctx.t,
        progress=ctx.progress,
        seeded=cfg.request_seed(0) is not None,
    )
    return CandidatesResult(**counts, future_model=name, max_abs_diff=record.get("max_abs_diff"))


FUTURE_CANDIDATES = Stage(
    name="future_candidates",
    run=future_candidates,
    queue="generate",
    result=CandidatesResult,
    description="temporal: M_f served (fingerprint verified) and N answers of M_f per paired prompt",
)


async def future_judgments(ctx: StageContext) -> JudgmentsResult:
    counts = await judge_file(
        ctx,
        "policy:self",
        self_model=await ctx.served(),
        source="future_candidates",
        output="future_judgments",
    )
    return JudgmentsResult(**counts)


FUTURE_JUDGMENTS = Stage(
    name="future_judgments",
    run=future_judgments,
    queue="judge",
    result=JudgmentsResult,
    shardable=True,
    description="temporal: M(t) judges the future model's answers",
)

STAGES = (ANCHORED_PAIRS, FUTURE_TRAIN, FUTURE_CANDIDATES, FUTURE_JUDGMENTS)
