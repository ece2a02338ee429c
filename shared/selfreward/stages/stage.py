"""The Stage record, the context a stage runs in, and running one stage.

A stage is a function from versioned inputs in the artifact store to versioned outputs there.
Its `Stage` record holds every fact the drivers need: its name, its async `run` function, the
RQ queue a distributed worker takes it from, whether it talks to the served policy, whether it
trains a model (the policy may sleep meanwhile), its job timeout, and the typed model of its result. `execute(ctx, stage)` is the one way to run it:

- a stage is done when `iter-<t>/<stage>.manifest.json` exists; `execute` of a done stage
  returns that manifest and runs nothing (idempotent);
- otherwise it runs the stage and writes the manifest: the envelope (stage, iteration, run,
  variant, seed, config sha256, start time, seconds of this attempt and of all, sha256 of the stage's JSONL output) plus
  the fields of the stage's result;
- every stage resumes from what it already wrote (each stage module says how), so running it
  again after a crash finishes the work without redoing it. Errors a user must fix
  (`SelfRewardError`) surface as `StageError` naming the stage.

One event loop per stage execution: `run_stage` is the synchronous entry point of both drivers
(`asyncio.run` once); inside, the `StageContext` owns ONE client of the policy service, opened
on first use and closed when the stage ends, and remembers the served name of every model it
resolved (`await ctx.served(t)`), publishing it again where a restarted server lost it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from selfreward.config import RunConfig
from selfreward.errors import SelfRewardError, StageError
from selfreward.llm.openai import OpenAICompatClient
from selfreward.progress import NULL_PROGRESS, Progress
from selfreward.storage import RunLayout, read_manifest, sha256_file, sha256_text, write_manifest

Queue = Literal["generate", "judge", "train", "evaluate"]
QUEUES: tuple[Queue, ...] = ("generate", "judge", "train", "evaluate")
DEFAULT_TIMEOUT_S = 6 * 3600
# the envelope every stage manifest carries besides its result's fields
ENVELOPE = (
    "stage",
    "iteration",
    "run",
    "variant",
    "seed",
    "config_sha256",
    "started_at",
    "seconds",
    "seconds_total",
    "peak_rss_bytes",  # the embedded mode: its process tree's peak while the stage ran (selfreward.memory)
    "outputs",
    "written_at",
)


class StageResult(BaseModel):
    """What a stage reports: the fields of its manifest beside the envelope.

    Subclasses declare the fields other code reads; a stage may report more (counts that vary
    by variant or source), kept as extra fields. Only the fields a stage set are written, so a
    manifest holds what the stage reported and nothing else.
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    def summary(self) -> str:
        """One readable line for the CLI's run summary."""
        return ""

    def manifest_fields(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)


def always(_: RunConfig) -> bool:
    return True


def never(_: RunConfig) -> bool:
    return False


@dataclass(frozen=True)
class Stage:
    """Everything the drivers need to know about one stage (see the module docstring)."""

    name: str
    run: Callable[[StageContext], Awaitable[StageResult]]
    queue: Queue
    result: type[StageResult]
    needs_policy: Callable[[RunConfig], bool] = always
    timeout_s: int = DEFAULT_TIMEOUT_S
    description: str = ""
    # the stage can run as `services.judge_shards` shard jobs plus a merge (distributed mode):
    # with StageContext.shard set, `run` does shard i of n only and its result is not a manifest
    shardable: bool = False
    # the stage trains a model (SFT, DPO): where the policy shares the trainer's GPU it sleeps
    # while the stage runs (policy.sleep_during_training, selfreward.policy.sleep)
    trains: bool = False

    def result_of(self, manifest: dict[str, Any]) -> StageResult:
        """The typed result held by one of this stage's manifests (InputError when it holds none)."""
        from pydantic import ValidationError

        from selfreward.errors import InputError

        try:
            return self.result.model_validate({k: v for k, v in manifest.items() if k not in ENVELOPE})
        except ValidationError as err:
            fields = ", ".join(".".join(map(str, e["loc"])) for e in err.errors())
            raise InputError(f"a manifest of stage {self.name!r} lacks or has bad fields: {fields}") from None

    def read_result(self, layout: RunLayout, t: int) -> StageResult | None:
        """The typed result of this stage of iteration t, or None when it has not run."""
        manifest = read_manifest(layout.stage_manifest(t, self.name))
        return None if manifest is None else self.result_of(manifest)


def model_name(t: int) -> str:
    """M(t)'s name in the artifact store: m0 (base), m1 (SFT), m2, ..."""
    return f"m{t}"


@dataclass
class StageContext:
    """Where a stage runs: the run's config and layout, iteration t, progress, services.

    `policy_url`: the policy service (default config.services.policy_url). `redis_url`: the
    verdict cache of the judges a stage builds and the shared limits of their backends and the
    teacher's (the distributed driver passes its Redis, the embedded driver none: in-process). Use it as `async with ctx:` (execute does) so that the
    policy client it opens is closed in the stage's event loop.
    """

    config: RunConfig
    layout: RunLayout
    t: int
    progress: Progress = NULL_PROGRESS
    policy_url: str | None = None
    redis_url: str | None = None
    earlier_seconds: float = 0.0  # wall time of this stage's earlier attempts (distributed mode)
    shard: tuple[int, int] | None = None  # (i, n): shard i of n of a shardable stage
    embedded: bool = False  # run by the embedded driver (training.subprocess: auto trains in a child)
    _policy: OpenAICompatClient | None = field(default=None, init=False, repr=False)
    _served: dict[int, str] = field(default_factory=dict, init=False, repr=False)

    @property
    def url(self) -> str:
        return self.policy_url or self.config.services.policy_url

    @property
    def policy(self) -> OpenAICompatClient:
        """The stage's one client of the policy service (opened on first use): `services.concurrency`
        requests in flight; its pool also serves the evaluation's answers (`eval.concurrency`)."""
        if self._policy is None:
            s = self.config.services
            self._policy = OpenAICompatClient(
                self.url,
                concurrency=s.concurrency,
                timeout_s=s.request_timeout_s,
                pool_size=self.config.eval.concurrency,
            )
        return self._policy

    async def aclose(self) -> None:
        if self._policy is not None:
            await self._policy.aclose()
            self._policy = None

    async def __aenter__(self) -> StageContext:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def file(self, stage: str) -> Path:
        return self.layout.stage_file(self.t, stage)

    def manifest_of(self, t: int, stage: str) -> dict[str, Any]:
        m = read_manifest(self.layout.stage_manifest(t, stage))
        if m is None:
            raise StageError(stage, f"needs stage {stage!r} of iteration {t}, which has not run")
        return m

    async def served(self, t: int | None = None) -> str:
        """The served name of M(t) (default: M(ctx.t)), published again if the server lost it."""
        t = self.t if t is None else t
        if t not in self._served:
            from selfreward.policy.publish import tolerance_for
            from selfreward.stages.publish import ensure_served

            self._served[t] = await ensure_served(
                self.policy, self.layout, t, tolerance_for(self.config.policy), self.config.services
            )
        return self._served[t]


async def run_in(ctx: StageContext, stage: Stage) -> StageResult:
    """The stage's function in its context (closed after); errors a user must fix surface as
    `StageError` naming the stage. `execute` and a shard job (`drivers.rq.run_shard`) use it."""
    async with ctx:
        try:
            return await stage.run(ctx)
        except StageError:
            raise
        except SelfRewardError as exc:
            raise StageError(stage.name, str(exc)) from exc


async def execute(ctx: StageContext, stage: Stage) -> dict[str, Any]:
    """Run `stage` of iteration ctx.t unless its manifest exists; return the manifest."""
    path = ctx.layout.stage_manifest(ctx.t, stage.name)
    done = read_manifest(path)
    if done is not None:
        return done
    started = time.time()
    result = await run_in(ctx, stage)
    elapsed = time.time() - started
    output = ctx.file(stage.name)
    manifest = {
        "stage": stage.name,
        "iteration": ctx.t,
        "run": ctx.layout.run,
        "variant": ctx.config.variant,
        "seed": ctx.config.seed,
        "config_sha256": sha256_text(ctx.config.model_dump_json()),
        "started_at": started,
        "seconds": round(elapsed, 2),  # this (the last) attempt's
        "seconds_total": round(elapsed + ctx.earlier_seconds, 2),  # all attempts' (distributed mode)
        **result.manifest_fields(),
    }
    if output.is_file():
        manifest["outputs"] = {output.name: sha256_file(output)}
    write_manifest(path, manifest)
    return manifest


def run_stage(ctx: StageContext, stage: Stage) -> dict[str, Any]:
    """`execute` in one event loop of its own: the drivers' synchronous entry point."""
    return asyncio.run(execute(ctx, stage))
