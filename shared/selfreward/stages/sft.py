"""Set-up stage `sft`: M1 = SFT(M0) on the seed data (IFT, and EFT when data.eft_in_sft).

Runs `selfreward.training.runner.run` (TRL SFTTrainer + PEFT LoRA), which resumes from its
last complete checkpoint and returns the model's manifest at once when
`models/m1/manifest.json` holds this exact job (the adapter exists, only this stage's manifest
was not written). The stage manifest keeps the headline of that model manifest (`TrainResult`).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from selfreward.stages.prepare import base_model_dir
from selfreward.stages.stage import Stage, StageContext, StageResult, model_name, never


def _num(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


class TrainResult(StageResult):
    """The stage manifest's view of a trainer manifest (models/<name>/manifest.json has it all)."""

    model: str | None = None
    adapter_sha256: str | None = None
    parent: str | None = None
    steps: int | None = None
    precision: str | None = None
    examples: int | None = None
    skipped: dict[str, int] | None = None
    # DPO: per pair kind, {"read", "examples", "skipped"}; `lost_kinds` read but none left
    by_kind: dict[str, dict[str, Any]] | None = None
    lost_kinds: list[str] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> TrainResult:
        training = manifest.get("training", {})
        data = manifest.get("data") or {}
        return cls(
            model=manifest.get("name"),
            adapter_sha256=manifest.get("adapter_sha256"),
            parent=(manifest.get("parent") or {}).get("name"),
            steps=training.get("global_step"),
            precision=training.get("precision"),
            examples=data.get("examples"),
            skipped=data.get("skipped"),
            by_kind=data.get("by_kind"),
            lost_kinds=sorted(
                k for k, v in (data.get("by_kind") or {}).items() if v.get("read") and not v.get("examples")
            ),
            metrics=manifest.get("metrics", {}),
        )

    def summary(self) -> str:
        met = self.metrics
        parts = [f"{self.model} steps={self.steps} examples={self.examples}"]
        if self.by_kind and len(self.by_kind) > 1:
            parts.append(
                "("
                + ", ".join(f"{k} {v.get('examples')}/{v.get('read')}" for k, v in self.by_kind.items())
                + ")"
            )
        if self.lost_kinds:
            parts.append(
                f"WARNING: no {'/'.join(self.lost_kinds)} pair left (skipped, see the model manifest)"
            )
        if "first_loss" in met and "last_loss" in met:
            parts.append(f"loss {_num(met['first_loss'])}->{_num(met['last_loss'])}")
        if "rewards/margins" in met:
            parts.append(f"margin={_num(met['rewards/margins'])} acc={_num(met.get('rewards/accuracies'))}")
        return " ".join(parts)


async def run(ctx: StageContext) -> TrainResult:
    from selfreward.training.request import sft_request
    from selfreward.training.runner import run as run_training

    request = sft_request(
        ctx.config,
        name=model_name(1),
        seed_dir=str(ctx.layout.seed_dir),
        base_model=str(base_model_dir(ctx)),
    )
    return TrainResult.of(run_training(request, ctx.progress, embedded=ctx.embedded))


STAGE = Stage(
    name="sft",
    run=run,
    queue="train",
    result=TrainResult,
    needs_policy=never,
    timeout_s=24 * 3600,
    description="M1 = SFT(M0) on the seed IFT (+ EFT) data",
    trains=True,
)
