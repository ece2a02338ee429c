"""The distributed driver: one RQ job per stage, chained with `depends_on`.

`enqueue_iteration` puts what `plan.pending` says is left of the set-up (iteration 0) and of
iteration t on the stages' queues (`Stage.queue`), each depending on the previous one, with RQ
retries and backoff and the stage's timeout (`Stage.timeout_s`). Each job runs `run_stage_job`,
which runs the same stage as the embedded driver (`stage.run_stage`) against the services
named in the run config, with the worker's Redis as the verdict cache of the judges the stage
builds. Stages resume from their last written record, so a retried job after a worker crash
continues where the dead one stopped. Where the policy sleeps during training
(selfreward.policy.sleep), a training job puts every replica to sleep and wakes them after, and
a stage that needs the policy first wakes any replica left asleep.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from typing import Any

import redis
from rq import Callback, Queue, Retry, get_current_job
from rq.command import send_stop_job_command
from rq.exceptions import AbandonedJobError, InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

from selfreward.drivers.stage_log import capture
from selfreward.drivers.state import LIVE, IterationState, RunStore
from selfreward.errors import ConfigError, EmptyResultError, InputError, StageError
from selfreward.llm.openai import SleepModeUnavailable
from selfreward.progress import Progress, rq_meta_sink
from selfreward.stages import plan
from selfreward.stages.stage import Stage, StageContext
from selfreward.storage import RunLayout, sha256_text

# errors a retry cannot fix: the stage fails at once (fix the cause, then resume the iteration)
# (and a policy that cannot sleep where the run says it sleeps during training)
NOT_RETRIED = (ConfigError, InputError, EmptyResultError, SleepModeUnavailable)
log = logging.getLogger(__name__)


def _job_id(run_id: str, t: int, stage_t: int, stage: str, attempt: int) -> str:
    """RQ job ids allow letters, digits, '_' and '-': run names may hold dots, so they get a hash."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", run_id)
    if safe != run_id:
        safe += "_" + sha256_text(run_id)[:8]
    return f"{safe}-it{t}-a{attempt}-{stage_t}-{stage}"


def shard_name(stage: str, i: int, n: int) -> str:
    """The job name of shard i of n of a stage: "judgments#1/3"."""
    return f"{stage}#{i}/{n}"


def parse_shard(name: str) -> tuple[str, tuple[int, int] | None]:
    """("judgments", (1, 3)) for "judgments#1/3"; (name, None) for a stage's own job."""
    stage, sep, rest = name.partition("#")
    if not sep:
        return name, None
    i, _, n = rest.partition("/")
    return stage, (int(i), int(n))


def log_name(name: str) -> str:
    """The stage-log name of a job name: "judgments.shard-1-of-3" for a shard (a file name)."""
    stage, shard = parse_shard(name)
    return stage if shard is None else f"{stage}.shard-{shard[0]}-of-{shard[1]}"


def chain_of(layout: RunLayout, t: int, method: str | None = None) -> list[tuple[int, Stage]]:
    """(iteration, stage) pairs still to run to finish iteration t, in order: the set-up's
    pending stages, then iteration t's (the stages of the run's method)."""
    return [(tt, s) for tt in sorted({0, t}) for s in plan.pending(layout, tt, method)]


def redis_url_of(conn: redis.Redis) -> str:
    """A URL of the server `conn` talks to (for the asyncio clients of the verdict cache)."""
    kw = conn.connection_pool.connection_kwargs
    auth = ""
    if kw.get("password"):
        from urllib.parse import quote

        auth = f"{quote(str(kw.get('username') or ''))}:{quote(str(kw['password']))}@"
    db = kw.get("db", 0)
    if kw.get("path"):
        return f"unix://{auth}{kw['path']}?db={db}"
    return f"redis://{auth}{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{db}"


def enqueue_stage(
    conn: redis.Redis,
    run_id: str,
    t: int,
    stage_t: int,
    stage: Stage,
    *,
    attempt: int = 0,
    depends_on: Job | list[Job] | None = None,
    retry: Retry | None = None,
    shard: tuple[int, int] | None = None,
) -> Job:
    """One stage job on the stage's queue, with its timeout (part of iteration t's chain);
    with `shard` (i, n), the job of shard i of n of a shardable stage."""
    name = stage.name if shard is None else shard_name(stage.name, *shard)
    job_part = stage.name if shard is None else f"{stage.name}-s{shard[0]}of{shard[1]}"
    return Queue(stage.queue, connection=conn).enqueue(
        "selfreward.drivers.rq.run_stage_job",
        run_id,
        t,
        stage_t,
        name,
        job_id=_job_id(run_id, t, stage_t, job_part, attempt),
        depends_on=depends_on,
        retry=retry,
        job_timeout=stage.timeout_s,
        result_ttl=7 * 24 * 3600,
        failure_ttl=30 * 24 * 3600,
        on_failure=Callback(on_stage_failure),
        on_stopped=Callback(on_stage_stopped),
        description=f"{run_id} iteration {t}: {name} (iter-{stage_t})",
        meta={"run": run_id, "t": t, "stage_t": stage_t, "stage": name},
    )


def enqueue_iteration(conn: redis.Redis, store: RunStore, run_id: str, t: int) -> IterationState:
    """Enqueue what is left of iteration t (idempotent: a live chain is not enqueued twice)."""
    config = store.config(run_id)
    layout = RunLayout(config.artifact_root, run_id)
    previous = store.iteration(run_id, t)
    attempt = (previous.attempt + 1) if previous else 0
    if previous is not None:  # a resumed chain replaces the old one: its waiting jobs must not run
        for old_id in previous.jobs.values():
            with contextlib.suppress(NoSuchJobError, InvalidJobOperation):
                old = Job.fetch(old_id, connection=conn)
                if old.get_status(refresh=True) in (
                    JobStatus.DEFERRED,
                    JobStatus.QUEUED,
                    JobStatus.SCHEDULED,
                ):
                    old.cancel()
    intervals = config.services.stage_retry_intervals_s
    retry = Retry(max=len(intervals), interval=intervals) if intervals else None
    jobs: dict[str, str] = {}
    prev_job: Job | None = None
    chain = chain_of(layout, t, config.variant)
    n = config.services.judge_shards
    for stage_t, stage in chain:
        depends: Job | list[Job] | None = prev_job
        if stage.shardable and n > 1:  # n shard jobs in parallel, then the stage's job merges
            shards = [
                enqueue_stage(
                    conn,
                    run_id,
                    t,
                    stage_t,
                    stage,
                    attempt=attempt,
                    depends_on=prev_job,
                    retry=retry,
                    shard=(i, n),
                )
                for i in range(n)
            ]
            for i, shard_job in enumerate(shards):
                jobs[f"{stage_t}:{shard_name(stage.name, i, n)}"] = shard_job.id
            depends = shards
        job = enqueue_stage(conn, run_id, t, stage_t, stage, attempt=attempt, depends_on=depends, retry=retry)
        jobs[f"{stage_t}:{stage.name}"] = job.id
        prev_job = job
    state = IterationState(
        t=t,
        status="queued" if chain else "done",
        jobs=jobs,
        error=None,
        failed_stage=None,
        started_at=time.time(),
        finished_at=None if chain else time.time(),
        attempt=attempt,
    )
    store.save_iteration(run_id, state)
    return state


def cancel_iteration(conn: redis.Redis, store: RunStore, run_id: str, t: int) -> None:
    """Mark iteration t cancelled, then cancel its waiting stage jobs and stop its running one
    (marked first: the failure callback of a stopped job then knows it was cancelled)."""
    state = store.iteration(run_id, t)
    if state is None:
        return
    if state.status in LIVE:
        store.update_iteration(run_id, t, status="cancelled", finished_at=time.time())
    for job_id in state.jobs.values():
        try:
            job = Job.fetch(job_id, connection=conn)
        except NoSuchJobError:
            continue
        status = job.get_status(refresh=True)
        if status == JobStatus.STARTED:
            with contextlib.suppress(InvalidJobOperation):
                send_stop_job_command(conn, job_id)
        elif status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
            job.cancel()


# ---------------------------------------------------------------- the job itself


def run_stage_job(run_id: str, t: int, stage_t: int, stage: str) -> dict[str, Any]:
    """The job of one stage: run `stage` of iteration `stage_t` for iteration t's chain.

    Each attempt is recorded (RunStore.start_attempt) and logs to its own file
    (RunLayout.stage_log); the iteration shows `running` once its own first stage starts and
    `waiting_for_setup` while set-up stages at the head of its chain run.
    """
    from selfreward.stages.stage import run_stage

    job = get_current_job()
    assert job is not None, "run_stage_job runs inside an RQ worker"
    base, shard = parse_shard(stage)
    store = RunStore(job.connection)
    state = store.iteration(run_id, t)
    if state is not None and state.status == "cancelled":
        raise RuntimeError(f"iteration {t} of run {run_id!r} was cancelled")
    config = store.config(run_id)
    layout = RunLayout(config.artifact_root, run_id)
    store.update_iteration(run_id, t, status="running" if stage_t == t else "waiting_for_setup")
    earlier = sum(a["seconds"] or 0.0 for a in store.attempts(run_id, stage_t, stage))
    attempt = store.start_attempt(run_id, stage_t, stage, job_id=job.id, worker=job.worker_name)
    job.meta["attempt"] = attempt
    job.save_meta()
    ctx = StageContext(
        config=config,
        layout=layout,
        t=stage_t,
        progress=Progress(rq_meta_sink(job)),
        redis_url=redis_url_of(job.connection),
        earlier_seconds=earlier,
        shard=shard,
    )
    with capture(layout.stage_log(stage_t, log_name(stage), attempt)):
        log.info("%s iteration %d: %s (iter-%d), attempt %d", run_id, t, stage, stage_t, attempt)
        the_stage = plan.stage_named(base, stage_t, config.variant)
        if shard is not None:
            with policy_for(ctx, the_stage):
                result = run_shard(ctx, the_stage)
            store.end_attempt(run_id, stage_t, stage, job_id=job.id, outcome="done")
            return {"stage": stage, "iteration": stage_t, "shard": list(shard), "result": result}
        with policy_for(ctx, the_stage):
            manifest = run_stage(ctx, the_stage)
        log.info("%s done in %.1f s: %s", stage, manifest["seconds"], the_stage.result_of(manifest).summary())
    store.end_attempt(run_id, stage_t, stage, job_id=job.id, outcome="done")
    last = chain_of(ctx.layout, t, config.variant) == []
    if last:
        store.update_iteration(run_id, t, status="done", finished_at=time.time())
        write_report(layout)
    return {"stage": stage, "iteration": stage_t, "manifest": manifest}


def policy_for(ctx: StageContext, stage: Stage) -> contextlib.AbstractContextManager[Any]:
    """The policy as the stage needs it, where it sleeps during training
    (policy.sleep_during_training; the services are elsewhere: `shares_gpu_with_trainer` says
    whether the trainer shares the policy's GPU): asleep while a training stage that has work
    left runs (woken after, also on failure), and awake before the stage that follows a training
    stage in the plan and talks to the policy (a training job killed before its `finally` leaves
    it asleep). Only that stage wakes it: another run's stages must not wake the policy while
    this run trains (several runs at once on one GPU: docs/deployment.md, Sleep mode)."""
    import asyncio

    from selfreward.policy.sleep import asleep_while, policy_urls, run_sleeps, wake_sleeping

    config = ctx.config
    if not run_sleeps(config, own_server=False) or plan.is_done(ctx.layout, ctx.t, stage):
        return contextlib.nullcontext()
    if stage.trains:
        return asleep_while(config, ctx.url, own_server=False)
    if stage.needs_policy(config) and follows_training(stage, ctx.t, config.variant):

        async def wake() -> None:
            await wake_sleeping(await policy_urls(config.services, ctx.url), config.services)

        asyncio.run(wake())
    return contextlib.nullcontext()


def follows_training(stage: Stage, t: int, method: str | None = None) -> bool:
    """`stage` comes right after a training stage (`Stage.trains`) in iteration t's plan."""
    stages = plan.stages_of(t, method)
    names = [s.name for s in stages]
    i = names.index(stage.name) if stage.name in names else -1
    return i > 0 and stages[i - 1].trains


def run_shard(ctx: StageContext, stage: Stage) -> dict[str, Any]:
    """One shard of a shardable stage (ctx.shard set): its part of the work and no manifest (the
    stage's own job writes it after merging the shards); a stage already done has nothing to do.
    Errors a user must fix surface as `StageError` naming the stage, as in `execute`."""
    import asyncio

    from selfreward.stages.stage import run_in

    if plan.is_done(ctx.layout, ctx.t, stage):
        return {"skipped": "the stage is done"}

    async def go() -> dict[str, Any]:
        started = time.time()
        result = await run_in(ctx, stage)
        log.info(
            "%s shard %s done in %.1f s: %s", stage.name, ctx.shard, time.time() - started, result.summary()
        )
        return result.manifest_fields()

    return asyncio.run(go())


def write_report(layout: RunLayout) -> None:
    """The run's HTML report after each finished iteration, as the embedded driver writes it; a
    report that cannot be written is logged, the iteration stays done."""
    from selfreward.reports.run_report import build_run_report

    try:
        build_run_report(layout)
    except Exception:
        log.exception("the run report of %s could not be written", layout.run)


def on_stage_failure(job: Job, connection: redis.Redis, exc_type: Any, exc: BaseException, tb: Any) -> None:
    """Mark the iteration failed once the stage has no retries left (RQ calls this on every failure).

    Bad input and bad configuration are not retried: RQ reads `retries_left` after this callback.
    """
    cause = exc.__cause__ if isinstance(exc, StageError) and exc.__cause__ is not None else exc
    if isinstance(cause, NOT_RETRIED):
        job.retries_left = 0
    meta = job.meta
    # the API shows this message: no traceback (RQ keeps it in the job's result, and the log)
    message = f"{type(exc).__name__}: {exc}" if exc is not None else "failed"
    store = RunStore(connection)
    state = store.iteration(meta["run"], meta["t"])
    cancelled = state is not None and state.status == "cancelled"
    outcome = "cancelled" if cancelled else "worker_lost" if isinstance(exc, AbandonedJobError) else "failed"
    store.end_attempt(
        meta["run"], meta["stage_t"], meta["stage"], job_id=job.id, outcome=outcome, error=message[:4000]
    )
    if cancelled:
        job.retries_left = 0  # a cancelled iteration's job is not retried
        return
    if job.should_retry:
        return
    store.update_iteration(
        meta["run"],
        meta["t"],
        status="failed",
        failed_stage=parse_shard(meta["stage"])[0],
        error=message[:4000],
        finished_at=time.time(),
    )


def on_stage_stopped(job: Job, connection: redis.Redis) -> None:
    """A stage job stopped on purpose (cancel): its attempt ends `cancelled`."""
    meta = job.meta
    RunStore(connection).end_attempt(
        meta["run"],
        meta["stage_t"],
        meta["stage"],
        job_id=job.id,
        outcome="cancelled",
        error="stopped by cancel",
    )


def on_horse_killed(job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
    """The worker's hook for a work-horse that died without a word (SIGKILL, out of memory):
    RQ calls no failure callback then, so the attempt is closed here."""
    import os

    signal_text = f" by signal {os.WTERMSIG(ret_val)}" if ret_val and os.WIFSIGNALED(ret_val) else ""
    meta = job.meta
    if "run" not in meta:  # not a stage job
        return
    RunStore(job.connection).end_attempt(
        meta["run"],
        meta["stage_t"],
        meta["stage"],
        job_id=job.id,
        outcome="failed",
        error=f"the work-horse (pid {retpid}) was killed{signal_text}",
    )
