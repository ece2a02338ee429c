"""Stage `publish` (set-up and every iteration): serve M(t+1) by name, verified by fingerprint.

`selfreward.policy.publish.publish_adapter` loads `models/m<t+1>/` into the policy server as
`m<t+1>-<sha256[:12]>` and checks that the server reproduces the fingerprint the trainer stored
(and differs from the parent M(t)). Re-publishing the same adapter is a no-op. A restarted vLLM
forgets adapters loaded at run time: `ensure_served` publishes them again (verified again)
whenever a later stage asks for a model the server lost.
"""

from __future__ import annotations

from selfreward.errors import StageError
from selfreward.llm.openai import OpenAICompatClient
from selfreward.stages.stage import Stage, StageContext, StageResult, model_name
from selfreward.storage import RunLayout


class PublishResult(StageResult):
    model: str
    served_name: str
    max_abs_diff: float | None = None

    def summary(self) -> str:
        diff = self.max_abs_diff
        return f"{self.served_name} (fingerprint diff {f'{diff:.3g}' if diff is not None else diff})"


async def run(ctx: StageContext) -> PublishResult:
    from selfreward.policy.publish import publish_adapter, tolerance_for

    name = model_name(ctx.t + 1)
    parent = _served_name(ctx.layout, ctx.t)
    record = await publish_adapter(
        ctx.policy, ctx.layout.model_dir(name), name=name, parent=parent, tol=tolerance_for(ctx.config.policy)
    )
    return PublishResult(model=name, **record)


def _served_name(layout: RunLayout, t: int) -> str:
    from selfreward.stages.plan import served_name

    return served_name(layout, t)


async def ensure_served(client: OpenAICompatClient, layout: RunLayout, t: int, tol: float) -> str:
    """M(t)'s served name, publishing it again if the policy server lost it (a restarted vLLM
    forgets adapters loaded at run time); the fingerprint is checked again (within `tol`)."""
    from selfreward.policy.publish import publish_adapter

    name = _served_name(layout, t)
    if t == 0 or name in await client.model_names():
        return name
    parent = await ensure_served(client, layout, t - 1, tol)
    record = await publish_adapter(
        client, layout.model_dir(model_name(t)), name=model_name(t), parent=parent, tol=tol
    )
    if record["served_name"] != name:
        raise StageError(
            "publish",
            f"{model_name(t)} changed since it was published as {name!r} (now {record['served_name']!r})",
        )
    return name


STAGE = Stage(
    name="publish",
    run=run,
    queue="generate",
    result=PublishResult,
    description="serve M(t+1) by name, verified by its fingerprint",
)
