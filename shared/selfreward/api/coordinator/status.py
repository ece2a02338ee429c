"""What the API shows: run summaries and per-iteration stage states, read from the manifests
(done), RQ (queued, running with progress, retrying, failed) and the coordinator's state."""

from __future__ import annotations

import time
from typing import Any

import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.utils import utcparse
from rq.worker import Worker

from selfreward.drivers.rq import parse_shard
from selfreward.drivers.state import RunNotFound, RunStore
from selfreward.drivers.worker import LOST_AFTER_S
from selfreward.stages import plan
from selfreward.storage import RunLayout, read_manifest

RQ_STATE = {
    "queued": "queued",
    "deferred": "waiting",
    "scheduled": "retrying",
    "started": "running",
    "finished": "done",
    "failed": "failed",
    "stopped": "cancelled",
    "canceled": "cancelled",
}
# manifest keys too bulky for the API
_BULKY = {"config", "inputs", "outputs"}


def _status(job: Job) -> str:
    status = job.get_status(refresh=True)
    return str(getattr(status, "value", status))


def worker_heartbeat(conn: redis.Redis, name: str) -> float | None:
    """The unix time of worker `name`'s last heartbeat; None when its key expired (or never was)."""
    raw = conn.hget(Worker.redis_worker_namespace_prefix + name, "last_heartbeat")
    if not raw:
        return None
    return utcparse(raw.decode()).timestamp()


def _job_for(store: RunStore, run_id: str, t: int, stage: str) -> str | None:
    """The newest job id of stage (t, stage) among the iterations' job chains."""
    key = f"{t}:{stage}"
    best: tuple[int, int, str] | None = None
    for it in store.iterations(run_id):
        st = store.iteration(run_id, it)
        if st is not None and key in st.jobs:
            cand = (st.attempt, it, st.jobs[key])
            if best is None or cand[:2] > best[:2]:
                best = cand
    return best[2] if best else None


def _job_state(
    store: RunStore, conn: redis.Redis, run_id: str, t: int, name: str, job_id: str | None
) -> dict[str, Any]:
    """State, progress, retries, worker (lost or not) and error of the job of `name` (a stage or
    one of its shards), and its attempts."""
    entry: dict[str, Any] = {}
    if job_id:
        entry["job_id"] = job_id
        try:
            job = Job.fetch(job_id, connection=conn)
        except NoSuchJobError:
            job = None
        if job is not None:
            status = _status(job)
            entry["state"] = RQ_STATE.get(status, status)
            if job.retries_left is not None:
                entry["retries_left"] = job.retries_left
            if "progress" in job.meta:
                entry["progress"] = job.meta["progress"]
            if entry["state"] == "running" and job.worker_name:
                entry["worker"] = job.worker_name
                beat = worker_heartbeat(conn, job.worker_name)
                entry["last_heartbeat"] = beat
                if beat is None or time.time() - beat > LOST_AFTER_S:
                    # the worker stopped sending heartbeats: RQ retries the job once its
                    # registry entry expires (docs/api.md, "When a worker is lost")
                    entry["state"] = "worker_lost"
            if entry["state"] == "failed":
                result = job.latest_result()
                if result is not None and result.exc_string:
                    entry["error"] = result.exc_string.strip().splitlines()[-1][:2000]
    attempts = store.attempts(run_id, t, name)
    if attempts:
        entry["attempts"] = attempts
    return entry


def _shard_names(store: RunStore, run_id: str, t: int, stage: str) -> list[str]:
    """The shard job names ("judgments#0/3", ...) of stage (t, stage) in the newest chain that has them."""
    best: tuple[int, int, list[str]] | None = None
    prefix = f"{t}:{stage}#"
    for it in store.iterations(run_id):
        st = store.iteration(run_id, it)
        if st is None:
            continue
        names = sorted((k.split(":", 1)[1] for k in st.jobs if k.startswith(prefix)), key=parse_shard)
        if names and (best is None or (st.attempt, it) > best[:2]):
            best = (st.attempt, it, names)
    return best[2] if best else []


# while a stage's merge job waits for its shards, the stage shows its most pressing shard state
_PRESSING = ("failed", "worker_lost", "running", "retrying", "queued", "waiting", "done")


def _with_shards(entry: dict[str, Any], shards: list[dict[str, Any]]) -> None:
    entry["shards"] = shards
    if entry.get("state") not in ("waiting", "pending"):
        return
    states = {s.get("state", "pending") for s in shards}
    for state in _PRESSING:
        if state in states:
            entry["state"] = "running" if state == "done" else state
            break
    done = total = 0
    for s in shards:
        p = s.get("progress") or {}
        done += int(p.get("done") or 0)
        total += int(p.get("total") or 0)
    entry["progress"] = {
        "task": entry["stage"],
        "done": done,
        "total": total or None,
        "shards": len(shards),
        "shards_started": sum(1 for s in shards if s.get("progress") or s.get("state") != "queued"),
        "shards_done": sum(1 for s in shards if s.get("state") == "done"),
    }


def stage_states(
    store: RunStore, conn: redis.Redis, run_id: str, layout: RunLayout, t: int
) -> list[dict[str, Any]]:
    out = []
    for s in plan.stages_of(t, store.config(run_id).variant):
        stage = s.name
        entry: dict[str, Any] = {"stage": stage, "queue": s.queue, "state": "pending"}
        entry.update(_job_state(store, conn, run_id, t, stage, _job_for(store, run_id, t, stage)))
        if s.shardable:
            names = _shard_names(store, run_id, t, stage)
            if names:
                shards = []
                for name in names:
                    shard = {"shard": name, "state": "pending"}
                    shard.update(_job_state(store, conn, run_id, t, name, _job_for(store, run_id, t, name)))
                    shards.append(shard)
                _with_shards(entry, shards)
        manifest = read_manifest(layout.stage_manifest(t, stage))
        if manifest is not None:
            entry["state"] = "done"
            entry["counts"] = {k: v for k, v in manifest.items() if k not in _BULKY}
        out.append(entry)
    return out


def chain_status(
    store: RunStore, conn: redis.Redis, run_id: str, t: int
) -> tuple[str, str | None, str | None]:
    """(status, failed stage, error) of iteration t's job chain, from the stored state and RQ.

    A stage job that RQ failed for good (no retries left) fails the iteration even where the
    failure callback could not run (a work-horse killed on its last attempt).
    """
    st = store.iteration(run_id, t)
    if st is None:
        return "pending", None, None
    if st.status in ("done", "cancelled", "failed"):
        return st.status, st.failed_stage, st.error
    for key, job_id in st.jobs.items():
        try:
            job = Job.fetch(job_id, connection=conn)
        except NoSuchJobError:
            continue
        if _status(job) == "failed":
            result = job.latest_result()
            error = result.exc_string.strip().splitlines()[-1] if result and result.exc_string else "failed"
            return "failed", parse_shard(key.split(":", 1)[1])[0], error
    return st.status, None, None


def iteration_detail(store: RunStore, conn: redis.Redis, run_id: str, t: int) -> dict[str, Any]:
    config = store.config(run_id)
    layout = RunLayout(config.artifact_root, run_id)
    st = store.iteration(run_id, t)
    stages = stage_states(store, conn, run_id, layout, t)
    if st is None and not any(s["state"] == "done" for s in stages) and t != 0:
        raise RunNotFound(f"iteration {t} of run {run_id!r} was never started")
    all_done = all(s["state"] == "done" for s in stages)
    # the set-up (t = 0) runs at the head of iteration 1's chain
    status, failed_stage, error = chain_status(store, conn, run_id, t if (t > 0 or st is not None) else 1)
    if all_done:
        status = "done"
    if status == "failed":
        # the failure callback marks the iteration failed before RQ moves the job to its failed
        # registry: the stage the stored state names is shown failed in that window too
        for s in stages:
            if s["stage"] == failed_stage and s["state"] in ("queued", "running", "retrying"):
                s["state"] = "failed"
                s.setdefault("error", error)
    lost = [s for s in stages if s["state"] == "worker_lost"]
    if status == "running" and lost:
        status = "worker_lost"
    if status in ("failed", "cancelled"):
        for s in stages:  # jobs waiting on a failed or cancelled stage will not run
            if s["state"] in ("queued", "waiting", "retrying"):
                s["state"] = "blocked"
    detail: dict[str, Any] = {
        "run": run_id,
        "t": t,
        "status": status,
        "model_in": plan.model_name(t) if t > 0 else plan.model_name(0),
        "model_out": plan.model_name(t + 1),
        "stages": stages,
    }
    if status == "failed":
        detail.update(error=error, failed_stage=failed_stage)
    if st is not None:
        detail.update(
            started_at=st.started_at,
            finished_at=st.finished_at,
            attempt=st.attempt,
        )
    pairs = read_manifest(layout.stage_manifest(t, "pairs")) if t > 0 else None
    if pairs is not None:
        detail["feedback"] = {k: v for k, v in pairs.items() if k not in _BULKY}
    evaluation = read_manifest(layout.stage_manifest(t, "evaluate")) if t > 0 else None
    if evaluation is not None:
        detail["metrics"] = evaluation.get(
            "metrics", {k: v for k, v in evaluation.items() if k not in _BULKY}
        )
        if detail["metrics"].get("judge_collapsed"):
            from selfreward.evaluation.judge_health import collapse_message, judge_health

            health = judge_health(layout, t, config.eval.collapse_threshold)
            detail["judge_collapse"] = True
            detail["warnings"] = [
                collapse_message(t, health) if health else f"judge collapse in iteration {t}"
            ]
    return detail


def run_summary(store: RunStore, conn: redis.Redis, run_id: str, brief: bool = False) -> dict[str, Any]:
    config = store.config(run_id)
    meta = store.run_meta(run_id)
    layout = RunLayout(config.artifact_root, run_id)
    iterations = []
    for t in sorted(set(store.iterations(run_id)) | {0}):
        done = plan.iteration_done(layout, t, config.variant)
        status = "done" if done else chain_status(store, conn, run_id, t if t > 0 else 1)[0]
        iterations.append({"t": t, "status": status})
    summary: dict[str, Any] = {
        "run": run_id,
        "variant": config.variant,
        "base_model": config.model.base,
        "created_at": meta["created_at"],
        "completed_iterations": max(0, plan.completed_iterations(layout, config.variant)),
        "iterations": iterations,
        "artifacts": str(layout.run_dir),
    }
    if not brief:
        summary["config"] = config.model_dump(mode="json")
        models = []
        for t in range(0, plan.completed_iterations(layout, config.variant) + 2):
            try:
                models.append({"model": plan.model_name(t), "served_name": plan.served_name(layout, t)})
            except LookupError:
                break
        summary["models"] = models
    return summary
