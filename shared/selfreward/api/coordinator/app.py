"""The coordinator's REST API (FastAPI): create runs, start and inspect iterations, read metrics.

Settings come from the environment (docs/api.md): REDIS_URL (or SELFREWARD_REDIS_URL),
SELFREWARD_API_TOKEN (bearer token required on every mutating route when set), and any
SELFREWARD_* config override, applied to every posted run config (a deployment pins
artifact_root and the service URLs this way).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import redis
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ValidationError
from rq import Queue

from selfreward import __version__
from selfreward.api.auth import require_token
from selfreward.api.coordinator import status as run_status
from selfreward.config import RunConfig, deep_merge, dump_config, env_overrides
from selfreward.drivers.rq import cancel_iteration, enqueue_iteration
from selfreward.drivers.state import Conflict, RunNotFound, RunStore
from selfreward.stages import plan
from selfreward.stages.stage import QUEUES
from selfreward.storage import RunLayout, atomic_write_text


class IterationStarted(BaseModel):
    run: str
    t: int
    status: str
    stages: list[str]
    jobs: dict[str, str]


def _validation_detail(err: ValidationError) -> list[dict[str, Any]]:
    out = []
    for e in err.errors():
        out.append(
            {
                "loc": ["body", *e["loc"]],
                "field": ".".join(str(p) for p in e["loc"]) or "(body)",
                "msg": "unknown setting" if e["type"] == "extra_forbidden" else e["msg"],
                "type": e["type"],
                "input": e.get("input") if not isinstance(e.get("input"), dict) else None,
            }
        )
    return out


def create_app(
    redis_url: str | None = None, api_token: str | None = None, environ: Mapping[str, str] | None = None
) -> FastAPI:
    environ = dict(os.environ if environ is None else environ)
    redis_url = (
        redis_url
        or environ.get("REDIS_URL")
        or environ.get("SELFREWARD_REDIS_URL")
        or "redis://127.0.0.1:6379/0"
    )
    api_token = (api_token if api_token is not None else environ.get("SELFREWARD_API_TOKEN")) or None
    conn = redis.Redis.from_url(redis_url)
    store = RunStore(conn)
    overrides = env_overrides(environ)

    registry = CollectorRegistry()
    requests_total = Counter(
        "selfreward_coordinator_requests_total",
        "HTTP requests",
        ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "selfreward_coordinator_request_seconds", "HTTP request latency", ["route"], registry=registry
    )
    iterations_started = Counter(
        "selfreward_iterations_started_total", "iterations enqueued", registry=registry
    )
    queue_length = Gauge("selfreward_queue_length", "jobs waiting per RQ queue", ["queue"], registry=registry)

    app = FastAPI(
        title="selfreward coordinator",
        version=__version__,
        description="Create runs, start and inspect iterations of the online feedback loop.",
    )
    authorize = require_token(api_token)

    @app.middleware("http")
    async def metrics_middleware(request: Request, call_next):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        requests_total.labels(request.method, path, str(response.status_code)).inc()
        latency.labels(path).observe(time.perf_counter() - start)
        return response

    @app.exception_handler(RunNotFound)
    async def not_found(_: Request, exc: RunNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(Conflict)
    async def conflict(_: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    def layout_of(run_id: str) -> tuple[RunConfig, RunLayout]:
        config = store.config(run_id)
        return config, RunLayout(config.artifact_root, run_id)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        try:
            conn.ping()
        except redis.RedisError as exc:
            raise HTTPException(503, f"redis unreachable: {exc}") from None
        return {"status": "ok", "version": __version__}

    @app.get("/metrics")
    def metrics() -> Response:
        for q in QUEUES:
            queue_length.labels(q).set(Queue(q, connection=conn).count)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/runs", status_code=201, dependencies=[Depends(authorize)])
    def create_run(body: dict[str, Any], response: Response) -> dict[str, Any]:
        """Create a run from a config (the YAML file's content as JSON). 422 lists every bad field."""
        try:
            config = RunConfig.model_validate(deep_merge(body, overrides))
        except ValidationError as err:
            raise HTTPException(422, _validation_detail(err)) from None
        created = store.create_run(config)
        layout = RunLayout(config.artifact_root, config.name)
        if not layout.config_path.exists():
            atomic_write_text(layout.config_path, dump_config(config))
        if not created:
            response.status_code = 200
        return run_status.run_summary(store, conn, config.name)

    @app.get("/runs")
    def list_runs() -> list[dict[str, Any]]:
        return [run_status.run_summary(store, conn, r, brief=True) for r in store.run_ids()]

    @app.get("/runs/{run_id}")
    def get_run(run_id: str) -> dict[str, Any]:
        return run_status.run_summary(store, conn, run_id)

    @app.post(
        "/runs/{run_id}/iterations",
        status_code=202,
        dependencies=[Depends(authorize)],
        response_model=IterationStarted,
    )
    def start_iteration(run_id: str) -> IterationStarted:
        """Start the next iteration (with the set-up stages first if they are not done)."""
        _config, layout = layout_of(run_id)
        if store.run_meta(run_id)["cancelled"]:
            raise Conflict(f"run {run_id!r} was cancelled")
        with store.lock(run_id):
            for t in store.iterations(run_id):
                st = store.iteration(run_id, t)
                if st is not None and st.status in ("queued", "running"):
                    raise Conflict(
                        f"iteration {t} of run {run_id!r} is {st.status}; wait for it or cancel the run"
                    )
                if st is not None and st.status in ("failed", "cancelled") and t >= 1:
                    raise Conflict(
                        f"iteration {t} of run {run_id!r} is {st.status}; "
                        f"resume it with POST /runs/{run_id}/iterations/{t}/resume"
                    )
            t = max(1, plan.completed_iterations(layout) + 1)
            state = enqueue_iteration(conn, store, run_id, t)
        iterations_started.inc()
        return IterationStarted(
            run=run_id, t=t, status=state.status, stages=list(state.jobs), jobs=state.jobs
        )

    @app.post(
        "/runs/{run_id}/iterations/{t}/resume",
        status_code=202,
        dependencies=[Depends(authorize)],
        response_model=IterationStarted,
    )
    def resume_iteration(run_id: str, t: int) -> IterationStarted:
        """Re-enqueue a failed or cancelled iteration from its first unfinished stage."""
        layout_of(run_id)
        st = store.iteration(run_id, t)
        if st is None:
            raise HTTPException(404, f"iteration {t} of run {run_id!r} was never started")
        if plan.iteration_done(layout_of(run_id)[1], t):
            raise Conflict(f"iteration {t} of run {run_id!r} is done")
        if run_status.chain_status(store, conn, run_id, t)[0] in ("queued", "running"):
            raise Conflict(f"iteration {t} of run {run_id!r} is still running")
        store.set_cancelled(run_id, False)
        with store.lock(run_id):
            state = enqueue_iteration(conn, store, run_id, t)
        return IterationStarted(
            run=run_id, t=t, status=state.status, stages=list(state.jobs), jobs=state.jobs
        )

    @app.get("/runs/{run_id}/iterations/{t}")
    def get_iteration(run_id: str, t: int) -> dict[str, Any]:
        """Stage states, progress, counts and metrics of iteration t (0 = set-up)."""
        return run_status.iteration_detail(store, conn, run_id, t)

    @app.post("/runs/{run_id}/cancel", dependencies=[Depends(authorize)])
    def cancel(run_id: str) -> dict[str, Any]:
        layout_of(run_id)
        store.set_cancelled(run_id, True)
        for t in store.iterations(run_id):
            cancel_iteration(conn, store, run_id, t)
        return run_status.run_summary(store, conn, run_id)

    return app
