"""The judge service: FastAPI over `selfreward.judging` (docs/judge.md).

    POST /v1/score    {instruction, responses[], judge?, samples?, mode?}
                      -> {judge, mode, template_sha256, results: [ScoreResult]}
    POST /v1/compare  {instruction, response_a, response_b, judge?, mode?} -> CompareResult
    GET  /healthz     liveness + what the service is configured with (no secrets)
    GET  /metrics     Prometheus text format

One `Judge` per spec, built on first use and shared by all requests (a request with another
mode gets a view of it with the same backend), so the per-backend concurrency bound and rate
limit hold across requests. Errors are JSON
{"detail": message}: 400 for a bad spec or setting, 401 without the bearer token (when
SELFREWARD_API_TOKEN is set), 502 when the backend rejects the judge (bad key, unknown model).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from selfreward import __version__
from selfreward.api.auth import require_token
from selfreward.api.judge.metrics import JudgeMetrics
from selfreward.api.judge.settings import JudgeSettings
from selfreward.errors import ConfigError, InputError, SelfRewardError
from selfreward.judging import CompareResult, LLMJudge, ScoreResult, make_judge

MAX_RESPONSES = 256
MAX_SAMPLES = 64


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instruction: str
    responses: list[str] = Field(min_length=1, max_length=MAX_RESPONSES)
    judge: str | None = Field(None, description="judge spec; default: the service's default judge")
    samples: int | None = Field(None, ge=1, le=MAX_SAMPLES, description="K; default judge.samples")
    mode: Literal["sample", "logprob"] | None = None


class ScoreResponse(BaseModel):
    judge: str
    mode: str
    template_sha256: str
    results: list[ScoreResult]


class CompareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instruction: str
    response_a: str
    response_b: str
    judge: str | None = None
    mode: Literal["sample", "logprob"] | None = None


class JudgePool:
    """The service's judges, one per (spec, mode)."""

    def __init__(self, settings: JudgeSettings, metrics: JudgeMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._judges: dict[tuple[str, str], LLMJudge] = {}
        self._lock = asyncio.Lock()

    async def get(self, spec: str | None, mode: str | None) -> LLMJudge:
        s = self.settings
        spec = spec or s.default_judge
        if not spec:
            raise ConfigError(
                ["no judge given and no default judge (set SELFREWARD_DEFAULT_JUDGE)"], "request"
            )
        config = s.config.judge
        async with self._lock:
            base = self._judges.get((spec, config.mode))
            if base is None:
                base = make_judge(
                    spec,
                    config,
                    policy_url=s.policy_url,
                    self_model=s.self_model,
                    teacher=s.config.teacher,
                    redis_url=s.redis_url,
                    observer=self.metrics,
                )
                self._judges[(spec, config.mode)] = base
            if mode is None or mode == config.mode:
                return base
            if (spec, mode) not in self._judges:
                # same backend (one concurrency bound and rate limit per backend), another mode
                self._judges[(spec, mode)] = base.with_config(config.model_copy(update={"mode": mode}))
            return self._judges[(spec, mode)]

    async def aclose(self) -> None:
        # judges of one spec share a backend and a cache: closing twice is harmless
        for judge in self._judges.values():
            await judge.aclose()
        self._judges.clear()


def create_app(settings: JudgeSettings | None = None) -> FastAPI:
    settings = settings or JudgeSettings.from_env()
    metrics = JudgeMetrics()
    pool = JudgePool(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await pool.aclose()

    app = FastAPI(title="selfreward judge", version=__version__, lifespan=lifespan)
    app.state.pool = pool
    app.state.metrics = metrics

    authorize = require_token(settings.api_token)

    @app.middleware("http")
    async def count_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.monotonic()
        response = await call_next(request)
        endpoint = request.url.path
        if endpoint in ("/v1/score", "/v1/compare", "/healthz", "/metrics"):
            metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
            metrics.latency.labels(endpoint=endpoint).observe(time.monotonic() - started)
        return response

    @app.exception_handler(SelfRewardError)
    async def user_error(request: Request, exc: SelfRewardError) -> JSONResponse:
        status = 400 if isinstance(exc, ConfigError | InputError) else 502
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.post("/v1/score", response_model=ScoreResponse, dependencies=[Depends(authorize)])
    async def score(body: ScoreRequest) -> ScoreResponse:
        judge = await pool.get(body.judge, body.mode)
        results = await judge.score(body.instruction, body.responses, body.samples)
        return ScoreResponse(
            judge=judge.name, mode=judge.mode, template_sha256=judge.template.sha256, results=results
        )

    @app.post("/v1/compare", response_model=CompareResult, dependencies=[Depends(authorize)])
    async def compare(body: CompareRequest) -> CompareResult:
        judge = await pool.get(body.judge, body.mode)
        return await judge.compare(body.instruction, body.response_a, body.response_b)

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        return {
            "status": "ok",
            "version": __version__,
            "default_judge": settings.default_judge,
            "cache": "redis" if settings.redis_url else "memory",
            "judges": sorted(f"{spec} ({mode})" for spec, mode in pool._judges),
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
