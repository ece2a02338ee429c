"""Iteration stage `train`: M(t+1) = DPO(M(t)) on the iteration's pairs.jsonl.

M(t)'s adapter is trained further and TRL keeps a frozen copy of it as the reference, so the
reference is M(t) (docs/training.md). A pairs manifest with a `preference_confidence` (cream's
consistency rate) makes the loss the soft-target one (`selfreward.training.arguments.dpo_loss`).
Resumes like `sft` (checkpoints; an existing model
manifest of this exact job is returned as it is).
"""

from __future__ import annotations

from collections.abc import Callable

from selfreward.stages.prepare import base_model_dir
from selfreward.stages.sft import TrainResult
from selfreward.stages.stage import Stage, StageContext, model_name, never
from selfreward.storage import read_manifest


def dpo_stage(name: str, pairs: str, model: Callable[[int], str], description: str) -> Stage:
    """A stage training `model(t)` = DPO(M(t)) on iteration t's `<pairs>.jsonl` (the train stage;
    temporal's future_train), reference M(t)."""

    async def run(ctx: StageContext) -> TrainResult:
        from selfreward.training.request import dpo_request
        from selfreward.training.runner import run as run_training

        # cream's consistency rate, where the pairs stage reported one
        done = read_manifest(ctx.layout.stage_manifest(ctx.t, pairs)) or {}
        confidence = done.get("preference_confidence")
        request = dpo_request(
            ctx.config,
            pairs=str(ctx.file(pairs)),
            name=model(ctx.t),
            parent=model_name(ctx.t),
            base_model=str(base_model_dir(ctx)),
            preference_confidence=confidence,
        )
        return TrainResult.of(run_training(request, ctx.progress, embedded=ctx.embedded))

    return Stage(
        name=name,
        run=run,
        queue="train",
        result=TrainResult,
        needs_policy=never,
        timeout_s=24 * 3600,
        description=description,
        trains=True,
    )


STAGE = dpo_stage(
    "train",
    "pairs",
    lambda t: model_name(t + 1),
    "M(t+1) = DPO(M(t)) on the iteration's pairs, reference M(t)",
)
