"""Stage `publish` (set-up and every iteration): serve M(t+1) by name, verified by fingerprint.

`selfreward.policy.publish.publish_adapter` loads `models/m<t+1>/` into the policy server as
`m<t+1>-<sha256[:12]>` and checks that the server reproduces the fingerprint the trainer stored
(and differs from the parent M(t)). Re-publishing the same adapter is a no-op. A restarted vLLM
forgets adapters loaded at run time: `ensure_served` publishes them again (verified again)
whenever a later stage asks for a model the server lost.

With a pool of policy replicas (`services.policy_pool`, selfreward.policy.pool) both do it on every
replica: publish loads and verifies the adapter on each (failing with the replica that
mismatched), `ensure_served` asks each replica and publishes on those that lost it; with
`services.policy_lora_dir` the verified adapter is also linked for the replicas' LoRA resolver.
"""

from __future__ import annotations

import asyncio

from selfreward.config import ServicesConfig
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
    from selfreward.policy.pool import publish_to_policy
    from selfreward.policy.publish import tolerance_for

    name = model_name(ctx.t + 1)
    parent = await ctx.served()  # M(t), on every replica of a pool
    record = await publish_to_policy(
        ctx.config.services,
        ctx.layout.model_dir(name),
        client=ctx.policy,
        name=name,
        parent=parent,
        tol=tolerance_for(ctx.config.policy),
    )
    return PublishResult(model=name, **record)


def _served_name(layout: RunLayout, t: int) -> str:
    from selfreward.stages.plan import served_name

    return served_name(layout, t)


async def ensure_served(
    client: OpenAICompatClient,
    layout: RunLayout,
    t: int,
    tol: float,
    services: ServicesConfig | None = None,
) -> str:
    """M(t)'s served name, publishing it again if the policy server lost it (a restarted vLLM
    forgets adapters loaded at run time); the fingerprint is checked again (within `tol`).

    With `services.policy_pool`, every replica is asked, and M(t) is published (verified) on each
    replica that does not list it, its parents first."""
    from selfreward.policy.pool import publish_to_replicas, replica_urls, served_names
    from selfreward.policy.publish import publish_adapter

    name = _served_name(layout, t)
    if t == 0:
        return name
    pool = services.policy_pool if services is not None else None
    if pool is None:
        if name in await client.model_names():
            return name
        parent = await ensure_served(client, layout, t - 1, tol, services)
        record = await publish_adapter(
            client, layout.model_dir(model_name(t)), name=model_name(t), parent=parent, tol=tol
        )
    else:
        urls = await replica_urls(pool)
        listed = await asyncio.gather(*(served_names(u, services) for u in urls))
        lacking = [u for u, names in zip(urls, listed, strict=True) if name not in names]
        if not lacking:
            return name
        parent = await ensure_served(client, layout, t - 1, tol, services)
        record = await publish_to_replicas(
            lacking,
            layout.model_dir(model_name(t)),
            name=model_name(t),
            parent=parent,
            tol=tol,
            services=services,
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
