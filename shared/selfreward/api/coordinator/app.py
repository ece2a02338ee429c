"""The coordinator's REST API (FastAPI): create runs, start and inspect iterations, read metrics.

Settings come from the environment (docs/api.md): REDIS_URL (or SELFREWARD_REDIS_URL),
SELFREWARD_API_TOKEN (bearer token of every route but /healthz, /metrics and the OpenAPI
documents; SELFREWARD_PUBLIC_READS=1 opens the GET routes for a trusted network), any
SELFREWARD_* config override, applied to every posted run config (a deployment pins
artifact_root and the service URLs this way), and the allow-lists of what a posted run may
name (selfreward.api.coordinator.trust). Errors are JSON {"detail": ...}: 401 without the token,
404 unknown run or iteration, 409 conflicts, 413 a body over 1 MiB, 422 a bad config (one entry
per field), 503 while Redis or the artifact store is unavailable. No answer carries a traceback.
The dashboard (selfreward.dashboard.router) is served at /ui.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from typing import Any, Literal

import redis
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ValidationError
from rq import Queue, Worker

from selfreward import __version__
from selfreward.api.auth import require_token
from selfreward.api.coordinator import status as run_status
from selfreward.api.coordinator.trust import Deployment
from selfreward.api.limits import BodyLimit, shown
from selfreward.config import RunConfig, deep_merge, dump_config, env_overrides
from selfreward.drivers.rq import cancel_iteration, enqueue_iteration
from selfreward.drivers.stage_log import attempt_logs, read_log
from selfreward.drivers.state import LIVE, Conflict, RunNotFound, RunStore
from selfreward.stages import plan
from selfreward.stages.stage import QUEUES
from selfreward.storage import RunLayout, atomic_write_text

MAX_BODY_BYTES = 1 << 20
ERRORS = {  # the error answers every route may give, for the OpenAPI document
    401: {"description": "missing or wrong bearer token"},
    503: {"description": "Redis or the artifact store is unavailable"},
}
RUN_ERRORS = {**ERRORS, 404: {"description": "no such run or iteration"}}


class Error(BaseModel):
    detail: Any


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
                "input": shown(e.get("input")) if not isinstance(e.get("input"), dict) else None,
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
    public_reads = environ.get("SELFREWARD_PUBLIC_READS", "").strip().lower() in ("1", "true", "yes")
    conn = redis.Redis.from_url(
        redis_url, socket_connect_timeout=5, socket_timeout=10, health_check_interval=15
    )
    store = RunStore(conn)
    overrides = env_overrides(environ)
    deployment = Deployment.from_env(environ)

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
    queue_length = Gauge(
        "selfreward_queue_length",
        "stage jobs per RQ queue and state (queued, deferred: waiting on an earlier stage, "
        "scheduled: a retry waiting for its delay, started)",
        ["queue", "state"],
        registry=registry,
    )
    workers_gauge = Gauge(
        "selfreward_workers", "live RQ workers listening on each queue", ["queue"], registry=registry
    )

    app = FastAPI(
        title="selfreward coordinator",
        version=__version__,
        description="Create runs, start and inspect iterations of the online feedback loop.",
    )
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    authorize = require_token(api_token)
    read = [] if public_reads else [Depends(authorize)]

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

    @app.exception_handler(redis.RedisError)
    async def redis_down(_: Request, exc: redis.RedisError) -> JSONResponse:
        return JSONResponse({"detail": f"redis unavailable ({type(exc).__name__})"}, status_code=503)

    @app.exception_handler(OSError)
    async def storage_down(_: Request, exc: OSError) -> JSONResponse:
        return JSONResponse(
            {"detail": f"artifact store unavailable ({type(exc).__name__}: {exc.strerror or exc})"},
            status_code=503,
        )

    def layout_of(run_id: str) -> tuple[RunConfig, RunLayout]:
        config = store.config(run_id)
        return config, RunLayout(config.artifact_root, run_id)

    @app.get("/healthz", responses={503: ERRORS[503]})
    def healthz() -> dict[str, Any]:
        try:
            conn.ping()
        except redis.RedisError as exc:
            raise HTTPException(503, f"redis unreachable ({type(exc).__name__})") from None
        return {"status": "ok", "version": __version__}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> Response:
        for q in QUEUES:
            queue = Queue(q, connection=conn)
            queue_length.labels(q, "queued").set(queue.count)
            queue_length.labels(q, "deferred").set(queue.deferred_job_registry.get_job_count(cleanup=False))
            queue_length.labels(q, "scheduled").set(queue.scheduled_job_registry.get_job_count(cleanup=False))
            queue_length.labels(q, "started").set(queue.started_job_registry.get_job_count(cleanup=False))
            workers_gauge.labels(q).set(Worker.count(queue=queue))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/runs",
        status_code=201,
        dependencies=[Depends(authorize)],
        responses={
            **ERRORS,
            200: {"description": "the run exists with the same config"},
            400: {"description": "the body is not JSON", "model": Error},
            409: {"description": "the run exists with another config", "model": Error},
            413: {"description": "the body is larger than 1 MiB", "model": Error},
            422: {"description": "a bad or not allowed setting (one entry per field)", "model": Error},
        },
    )
    def create_run(body: dict[str, Any], response: Response) -> dict[str, Any]:
        """Create a run from a config (the YAML file's content as JSON). 422 lists every bad field,
        and every setting outside what the deployment allows (docs/api.md, trust model)."""
        try:
            config = RunConfig.model_validate(deep_merge(body, overrides))
        except ValidationError as err:
            raise HTTPException(422, _validation_detail(err)) from None
        problems = deployment.check(config)
        if problems:
            raise HTTPException(422, problems)
        layout = RunLayout(config.artifact_root, config.name)
        text = dump_config(config)
        try:
            existing = store.config(config.name)
        except RunNotFound:
            existing = None
        if existing is not None:
            if existing.model_dump_json() != config.model_dump_json():
                raise Conflict(f"run {config.name!r} exists with a different config; choose another name")
            response.status_code = 200
            return run_status.run_summary(store, conn, config.name)
        # write the run's folder first, then register it (a failed write registers nothing)
        if layout.config_path.is_file():
            if layout.config_path.read_text(encoding="utf-8") != text:
                raise Conflict(
                    f"{layout.run_dir} holds a run of another config; remove it or choose another name"
                )
        else:
            atomic_write_text(layout.config_path, text)
        if not store.create_run(config):
            response.status_code = 200
        summary = run_status.run_summary(store, conn, config.name)
        replaced = deployment.replaced(body)
        if replaced:
            summary["replaced"] = replaced  # the deployment's values of these were kept
        return summary

    @app.get("/runs", dependencies=read, responses=ERRORS)
    def list_runs() -> list[dict[str, Any]]:
        """Every run, brief; a run whose stored state cannot be read is listed with its error."""
        out = []
        for run_id in store.run_ids():
            try:
                out.append(run_status.run_summary(store, conn, run_id, brief=True))
            except redis.RedisError:
                raise
            except Exception as exc:  # one bad record never hides the others
                out.append({"run": run_id, "error": f"unreadable ({type(exc).__name__})"})
        return out

    @app.get("/runs/{run_id}", dependencies=read, responses=RUN_ERRORS)
    def get_run(run_id: str) -> dict[str, Any]:
        return run_status.run_summary(store, conn, run_id)

    @app.delete(
        "/runs/{run_id}",
        dependencies=[Depends(authorize)],
        responses={**RUN_ERRORS, 409: {"description": "an iteration is queued or running", "model": Error}},
    )
    def delete_run(run_id: str, artifacts: Literal["keep", "delete"] = "keep") -> dict[str, Any]:
        """Forget a run (its state in Redis). `artifacts=delete` also removes runs/<run>/ from
        the artifact store; by default the files stay (a new run of the same config resumes them)."""
        config, layout = layout_of(run_id)
        with store.lock(run_id):
            for t in store.iterations(run_id):
                if run_status.chain_status(store, conn, run_id, t)[0] in LIVE:
                    raise Conflict(f"iteration {t} of run {run_id!r} is live; cancel the run first")
            store.delete_run(run_id)
        removed = False
        if artifacts == "delete" and layout.run_dir.is_dir():
            root = config.artifact_root.resolve()
            if layout.run_dir.resolve().is_relative_to(root):
                shutil.rmtree(layout.run_dir)
                removed = True
        return {"run": run_id, "deleted": True, "artifacts": "deleted" if removed else "kept"}

    @app.post(
        "/runs/{run_id}/iterations",
        status_code=202,
        dependencies=[Depends(authorize)],
        response_model=IterationStarted,
        responses={
            **RUN_ERRORS,
            409: {"description": "an iteration is live, failed or done", "model": Error},
        },
    )
    def start_iteration(run_id: str) -> IterationStarted:
        """Start the next iteration (with the set-up stages first if they are not done); a
        cancelled one is resumed."""
        _config, layout = layout_of(run_id)
        with store.lock(run_id):
            for t in store.iterations(run_id):
                st = store.iteration(run_id, t)
                if st is not None and st.status in LIVE:
                    raise Conflict(
                        f"iteration {t} of run {run_id!r} is {st.status}; wait for it or cancel the run"
                    )
                if st is not None and st.status == "failed" and t >= 1:
                    raise Conflict(
                        f"iteration {t} of run {run_id!r} is {st.status}; "
                        f"resume it with POST /runs/{run_id}/iterations/{t}/resume"
                    )
            t = max(1, plan.completed_iterations(layout, _config.variant) + 1)
            from selfreward.evaluation.judge_health import collapse_stop

            stop = collapse_stop(layout, t - 1, _config)
            if stop is not None:
                raise Conflict(stop)
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
        responses={
            **RUN_ERRORS,
            409: {"description": "an iteration is live, failed or done", "model": Error},
        },
    )
    def resume_iteration(run_id: str, t: int) -> IterationStarted:
        """Re-enqueue a failed or cancelled iteration from its first unfinished stage."""
        config, layout = layout_of(run_id)
        st = store.iteration(run_id, t)
        if st is None:
            raise HTTPException(404, f"iteration {t} of run {run_id!r} was never started")
        if plan.iteration_done(layout, t, config.variant):
            raise Conflict(f"iteration {t} of run {run_id!r} is done")
        if run_status.chain_status(store, conn, run_id, t)[0] in LIVE:
            raise Conflict(f"iteration {t} of run {run_id!r} is still running")
        with store.lock(run_id):
            state = enqueue_iteration(conn, store, run_id, t)
        return IterationStarted(
            run=run_id, t=t, status=state.status, stages=list(state.jobs), jobs=state.jobs
        )

    @app.get("/runs/{run_id}/iterations/{t}", dependencies=read, responses=RUN_ERRORS)
    def get_iteration(run_id: str, t: int) -> dict[str, Any]:
        """Stage states, progress, counts and metrics of iteration t (0 = set-up)."""
        return run_status.iteration_detail(store, conn, run_id, t)

    @app.get(
        "/runs/{run_id}/iterations/{t}/stages/{stage}/log",
        dependencies=read,
        response_class=PlainTextResponse,
        responses={**RUN_ERRORS, 404: {"description": "no such run, stage or attempt log"}},
    )
    def stage_log(
        run_id: str,
        t: int,
        stage: str,
        attempt: int | None = Query(None, ge=1, description="default: the last attempt"),
        tail: int | None = Query(None, ge=0, le=100_000, description="only the last lines"),
    ) -> PlainTextResponse:
        """What the worker printed for one attempt of a stage (runs/<run>/logs/iter-<t>/)."""
        config, layout = layout_of(run_id)
        names = {s.name for s in plan.stages_of(t, config.variant)} if t >= 0 else set()
        if stage not in names:
            raise HTTPException(404, f"iteration {t} of run {run_id!r} has no stage {stage!r}")
        logs = attempt_logs(layout.stage_log(t, stage, 1).parent, stage)
        number = attempt if attempt is not None else max(logs, default=1)
        if number not in logs:
            raise HTTPException(404, f"no log of attempt {number} of {stage} in iteration {t}")
        return PlainTextResponse(read_log(logs[number], tail))

    @app.post("/runs/{run_id}/cancel", dependencies=[Depends(authorize)], responses=RUN_ERRORS)
    def cancel(run_id: str) -> dict[str, Any]:
        """Stop the live iteration's queued and running stage jobs (a running one is stopped,
        what it wrote stays) and mark that iteration cancelled. Nothing else changes: finished
        iterations stay done, and a later start or resume continues the cancelled iteration."""
        layout_of(run_id)
        cancelled = []
        with store.lock(run_id):
            for t in store.iterations(run_id):
                st = store.iteration(run_id, t)
                if st is not None and run_status.chain_status(store, conn, run_id, t)[0] in LIVE:
                    cancel_iteration(conn, store, run_id, t)
                    cancelled.append(t)
        return {**run_status.run_summary(store, conn, run_id), "cancelled_iterations": cancelled}

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with the RunConfig schema for POST /runs' body."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schema = RunConfig.model_json_schema(ref_template="#/components/schemas/{model}")
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            components.update(schema.pop("$defs", {}))
            components["RunConfig"] = schema
            doc["paths"]["/runs"]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RunConfig"}}},
            }
            app.openapi_schema = doc
        return app.openapi_schema

    from selfreward.dashboard.coordinator_source import CoordinatorSource
    from selfreward.dashboard.router import dashboard_router

    # the dashboard at /ui: its pages and scripts are open (they hold no data), its JSON reads
    # are guarded as the API's reads are, its actions are the POST routes above (token)
    app.include_router(
        dashboard_router(
            CoordinatorSource(conn),
            read_dependencies=read,
            auth_required=api_token is not None and not public_reads,
        )
    )

    app.openapi = openapi  # type: ignore[method-assign]
    return app
