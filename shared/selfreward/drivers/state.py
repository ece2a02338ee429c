"""Run state of the coordinator, in Redis (with AOF in compose) beside the artifact manifests.

Keys (prefix `selfreward:`):
    runs                        sorted set of run ids by creation time
    run:<id>                    hash: config (JSON), created_at, artifact_root
    run:<id>:iter:<t>           hash: status, jobs (JSON {stage: job id}), error, failed_stage,
                                started_at, finished_at, attempt
    run:<id>:attempts:<t>:<stage>  list of JSON attempts of stage (t, stage): number, job id,
                                worker, started_at, ended_at, seconds, outcome, error
    lock:run:<id>               short lock around starting an iteration

What is done is read from the artifact store (a stage is done when its manifest exists);
what is queued or running is read from RQ by job id. So after a coordinator restart the state
is exactly what the workers and the manifests say.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis

from selfreward.config import RunConfig, build_config
from selfreward.errors import SelfRewardError

PREFIX = "selfreward:"


# an iteration in one of these has work queued or running (a lost worker's stage included)
LIVE = ("queued", "waiting_for_setup", "running", "worker_lost")


class RunNotFound(SelfRewardError):
    pass


class Conflict(SelfRewardError):
    pass


@dataclass
class IterationState:
    t: int
    status: str  # queued | waiting_for_setup | running | done | failed | cancelled
    jobs: dict[str, str]
    error: str | None
    failed_stage: str | None
    started_at: float | None
    finished_at: float | None
    attempt: int


class RunStore:
    def __init__(self, conn: redis.Redis) -> None:
        self.r = conn

    # ------------------------------------------------------------ runs

    def _run_key(self, run_id: str) -> str:
        return f"{PREFIX}run:{run_id}"

    def _iter_key(self, run_id: str, t: int) -> str:
        return f"{PREFIX}run:{run_id}:iter:{t}"

    def create_run(self, config: RunConfig) -> bool:
        """Register a run in one transaction; False if it exists with the same config (Conflict if
        with another). Nothing is half-registered: the config, its metadata and the index entry
        are written together, or not at all."""
        key = self._run_key(config.name)
        body = config.model_dump_json()
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    existing = pipe.hget(key, "config")
                    if existing is not None:
                        pipe.unwatch()
                        if json.loads(existing) == json.loads(body):
                            return False
                        raise Conflict(
                            f"run {config.name!r} exists with a different config; choose another name"
                        )
                    now = time.time()
                    pipe.multi()
                    pipe.hset(key, mapping={"config": body, "created_at": now})
                    pipe.zadd(f"{PREFIX}runs", {config.name: now})
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def delete_run(self, run_id: str) -> None:
        """Forget a run: its config, iterations, attempts and index entry (the artifacts are the
        caller's)."""
        keys = [self._run_key(run_id), *(self._iter_key(run_id, t) for t in self.iterations(run_id))]
        keys += list(self.r.scan_iter(match=f"{self._run_key(run_id)}:attempts:*", count=1000))
        with self.r.pipeline() as pipe:
            pipe.delete(*keys)
            pipe.zrem(f"{PREFIX}runs", run_id)
            pipe.execute()

    def exists(self, run_id: str) -> bool:
        return bool(self.r.exists(self._run_key(run_id)))

    def config(self, run_id: str) -> RunConfig:
        raw = self.r.hget(self._run_key(run_id), "config")
        if raw is None:
            raise RunNotFound(f"no run {run_id!r}")
        return build_config(json.loads(raw), environ={}, source=f"run {run_id}")

    def run_ids(self) -> list[str]:
        return [x.decode() for x in self.r.zrange(f"{PREFIX}runs", 0, -1)]

    def run_meta(self, run_id: str) -> dict[str, Any]:
        raw = self.r.hgetall(self._run_key(run_id))
        if not raw:
            raise RunNotFound(f"no run {run_id!r}")
        meta = {k.decode(): v.decode() for k, v in raw.items() if k != b"config"}
        return {"created_at": float(meta.get("created_at", 0))}

    # ------------------------------------------------------------ iterations

    def iterations(self, run_id: str) -> list[int]:
        raw = self.r.hget(self._run_key(run_id), "iterations")
        return sorted(json.loads(raw)) if raw else []

    def iteration(self, run_id: str, t: int) -> IterationState | None:
        raw = self.r.hgetall(self._iter_key(run_id, t))
        if not raw:
            return None
        h = {k.decode(): v.decode() for k, v in raw.items()}
        return IterationState(
            t=t,
            status=h.get("status", "queued"),
            jobs=json.loads(h.get("jobs", "{}")),
            error=h.get("error") or None,
            failed_stage=h.get("failed_stage") or None,
            started_at=float(h["started_at"]) if h.get("started_at") else None,
            finished_at=float(h["finished_at"]) if h.get("finished_at") else None,
            attempt=int(h.get("attempt", "0")),
        )

    def save_iteration(self, run_id: str, state: IterationState) -> None:
        self.r.hset(
            self._iter_key(run_id, state.t),
            mapping={
                "status": state.status,
                "jobs": json.dumps(state.jobs),
                "error": state.error or "",
                "failed_stage": state.failed_stage or "",
                "started_at": "" if state.started_at is None else state.started_at,
                "finished_at": "" if state.finished_at is None else state.finished_at,
                "attempt": state.attempt,
            },
        )
        ts = set(self.iterations(run_id)) | {state.t}
        self.r.hset(self._run_key(run_id), "iterations", json.dumps(sorted(ts)))

    def update_iteration(self, run_id: str, t: int, **fields: Any) -> None:
        mapping = {
            k: ("" if v is None else json.dumps(v) if isinstance(v, dict) else v) for k, v in fields.items()
        }
        self.r.hset(self._iter_key(run_id, t), mapping=mapping)

    # ------------------------------------------------------------ stage attempts

    def _attempts_key(self, run_id: str, t: int, stage: str) -> str:
        return f"{self._run_key(run_id)}:attempts:{t}:{stage}"

    def start_attempt(self, run_id: str, t: int, stage: str, *, job_id: str, worker: str | None) -> int:
        """Record a new attempt of stage (t, stage); return its number (1, 2, ...). An earlier
        attempt still marked running never reported its end: it is closed as `lost`."""
        key = self._attempts_key(run_id, t, stage)
        for i, entry in enumerate(self.attempts(run_id, t, stage)):
            if entry["outcome"] == "running":
                entry.update(outcome="lost", error=entry.get("error") or "ended without a report")
                self.r.lset(key, i, json.dumps(entry))
        entry = {
            "job_id": job_id,
            "worker": worker,
            "started_at": time.time(),
            "ended_at": None,
            "seconds": None,
            "outcome": "running",
            "error": None,
        }
        number = int(self.r.rpush(key, json.dumps(entry)))
        self.r.lset(key, number - 1, json.dumps({"attempt": number, **entry}))
        return number

    def end_attempt(
        self, run_id: str, t: int, stage: str, *, job_id: str, outcome: str, error: str | None = None
    ) -> dict[str, Any] | None:
        """Close the running attempt of `job_id` (done | failed | worker_lost | cancelled)."""
        key = self._attempts_key(run_id, t, stage)
        entries = self.attempts(run_id, t, stage)
        for i in range(len(entries) - 1, -1, -1):
            entry = entries[i]
            if entry["job_id"] == job_id and entry["outcome"] == "running":
                now = time.time()
                entry.update(
                    outcome=outcome,
                    error=error,
                    ended_at=now,
                    seconds=round(now - entry["started_at"], 2),
                )
                self.r.lset(key, i, json.dumps(entry))
                return entry
        return None

    def attempts(self, run_id: str, t: int, stage: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.r.lrange(self._attempts_key(run_id, t, stage), 0, -1)]

    @contextmanager
    def lock(self, run_id: str, timeout_s: float = 30.0) -> Iterator[None]:
        lock = self.r.lock(f"{PREFIX}lock:run:{run_id}", timeout=timeout_s, blocking_timeout=timeout_s)
        if not lock.acquire():
            raise Conflict(f"run {run_id!r} is busy; try again")
        try:
            yield
        finally:
            lock.release()
