"""The judge service: FastAPI over `selfreward.judging` (docs/judge.md).

    POST /v1/score    {instruction, responses[], judge?, samples?, mode?}
                      -> {judge, mode, template_sha256, results: [ScoreResult]}
    POST /v1/compare  {instruction, response_a, response_b, judge?, mode?} -> CompareResult
    GET  /healthz     liveness + what the service is configured with (no secrets)
    GET  /metrics     Prometheus text format (selfreward_judge_in_flight: the autoscaling signal)

One `LLMJudge` per spec, built on first use (the default judge at start, its backend's client
included, so that the first request does not pay for it) and shared by all requests (a request with another
mode gets a view of it with the same backend), so the per-backend concurrency bound and rate
limits hold across requests; with REDIS_URL they hold across replicas and stage workers too (one
budget per backend in Redis, selfreward.llm.limits.SharedLimits). Only the deployment's judges are built: `policy:<model>` (the
deployment's policy service), the default judge, and specs matching SELFREWARD_ALLOWED_BACKENDS;
at most SELFREWARD_MAX_JUDGES (32) are kept, the least recently used closed first. All judges
share one verdict cache, which degrades to no cache while Redis is away (/healthz says so).

Limits: a body of at most 8 MiB, an instruction and each response of at most 100,000
characters, at most 256 responses and 512 verdicts (responses x samples) per request. Errors
are JSON {"detail": message}: 400 for a bad spec or setting, 401 without the bearer token (when
SELFREWARD_API_TOKEN is set), 403 for a judge the deployment does not allow, 413 for a body
over the limit, 422 for a malformed request, 502 when the backend rejects the judge (bad key,
unknown model). /healthz and /metrics are public; neither lists the judges in use.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from selfreward import __version__
from selfreward.api.auth import require_token
from selfreward.api.judge.metrics import JudgeMetrics
from selfreward.api.judge.settings import JudgeSettings
from selfreward.api.limits import BodyLimit
from selfreward.errors import ConfigError, InputError, SelfRewardError
from selfreward.judging import CompareResult, LLMJudge, ScoreResult, VerdictCache, make_judge
from selfreward.llm.specs import read_spec

log = logging.getLogger(__name__)

MAX_RESPONSES = 256
MAX_SAMPLES = 64
MAX_VERDICTS = 512  # responses x samples of one request
MAX_TEXT = 100_000  # characters of the instruction and of each response
MAX_SPEC = 4096
MAX_BODY_BYTES = 8 << 20
JUDGING_ENDPOINTS = frozenset({"/v1/score", "/v1/compare"})  # counted in selfreward_judge_in_flight
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT)]
ERRORS = {
    401: {"description": "missing or wrong bearer token"},
    403: {"description": "a judge this deployment does not allow"},
    413: {"description": "the body is larger than 8 MiB"},
    502: {"description": "the judge's backend refused (bad key, unknown model)"},
}


class NotAllowed(SelfRewardError):
    pass


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instruction: Text
    responses: list[Text] = Field(min_length=1, max_length=MAX_RESPONSES)
    judge: str | None = Field(
        None, max_length=MAX_SPEC, description="judge spec; default: the service's default judge"
    )
    samples: int | None = Field(None, ge=1, le=MAX_SAMPLES, description="K; default judge.samples")
    mode: Literal["sample", "logprob"] | None = None


class ScoreResponse(BaseModel):
    judge: str
    mode: str
    template_sha256: str
    results: list[ScoreResult]


class CompareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instruction: Text
    response_a: Text
    response_b: Text
    judge: str | None = Field(None, max_length=MAX_SPEC)
    mode: Literal["sample", "logprob"] | None = None


class JudgePool:
    """The service's judges: one per (spec, mode), at most `settings.max_judges` specs (LRU)."""

    def __init__(self, settings: JudgeSettings, metrics: JudgeMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.cache = VerdictCache(
            settings.redis_url, ttl_s=settings.config.judge.cache_ttl_s, on_error=metrics.cache_error
        )
        self._judges: OrderedDict[str, dict[str, LLMJudge]] = OrderedDict()
        self._lock = asyncio.Lock()

    def allowed(self, spec: str) -> bool:
        s = self.settings
        return (
            spec.startswith("policy:")
            or spec == s.default_judge
            or any(fnmatch.fnmatchcase(spec, p) for p in s.allowed_backends)
        )

    def __len__(self) -> int:
        return sum(len(modes) for modes in self._judges.values())

    @property
    def specs(self) -> int:
        """Specs held (each with one backend, and a judge per mode asked for)."""
        return len(self._judges)

    async def get(self, spec: str | None, mode: str | None) -> LLMJudge:
        s = self.settings
        spec = spec or s.default_judge
        if not spec:
            raise ConfigError(
                ["no judge given and no default judge (set SELFREWARD_DEFAULT_JUDGE)"], "request"
            )
        read_spec(spec)  # a malformed spec is a 400 naming the forms
        if not self.allowed(spec):
            raise NotAllowed(
                f"judge {spec[:200]!r} is not one this deployment allows (policy:<model>, the default "
                "judge, SELFREWARD_ALLOWED_BACKENDS)"
            )
        config = s.config.judge
        mode = mode or config.mode
        evicted: list[LLMJudge] = []
        async with self._lock:
            modes = self._judges.get(spec)
            if modes is None:
                base = make_judge(
                    spec,
                    config,
                    policy_url=s.policy_url,
                    self_model=s.self_model,
                    teacher=s.config.teacher,
                    redis_url=s.redis_url,
                    observer=self.metrics,
                    cache=self.cache,
                )
                modes = self._judges[spec] = {config.mode: base}
                while len(self._judges) > s.max_judges:
                    _, old = self._judges.popitem(last=False)
                    evicted.append(next(iter(old.values())))  # its modes share one backend
            self._judges.move_to_end(spec)
            if mode not in modes:
                # same backend (one concurrency bound and rate limit per backend), another mode
                base = next(iter(modes.values()))
                modes[mode] = base.with_config(config.model_copy(update={"mode": mode}))
            judge = modes[mode]
        for old in evicted:
            await old.aclose()
        return judge

    async def warm(self) -> None:
        """Build the default judge and its backend's client at start (sends no request). A default
        that cannot be built is logged and left to the first request, which gets the error."""
        if not self.settings.default_judge:
            return
        try:
            judge = await self.get(None, None)
            judge.backend.start()
        except SelfRewardError as exc:
            log.warning("default judge %s not built at start: %s", self.settings.default_judge, exc)

    async def aclose(self) -> None:
        for modes in self._judges.values():
            await next(iter(modes.values())).aclose()
        self._judges.clear()
        await self.cache.aclose()


def create_app(settings: JudgeSettings | None = None) -> FastAPI:
    settings = settings or JudgeSettings.from_env()
    metrics = JudgeMetrics()
    pool = JudgePool(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pool.warm()
        yield
        await pool.aclose()

    app = FastAPI(title="selfreward judge", version=__version__, lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    app.state.pool = pool
    app.state.metrics = metrics

    authorize = require_token(settings.api_token)

    @app.middleware("http")
    async def count_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.monotonic()
        endpoint = request.url.path
        judging = endpoint in JUDGING_ENDPOINTS
        if judging:
            metrics.in_flight.inc()
        try:
            response = await call_next(request)
        finally:
            if judging:
                metrics.in_flight.dec()
        if judging or endpoint in ("/healthz", "/metrics"):
            metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
            metrics.latency.labels(endpoint=endpoint).observe(time.monotonic() - started)
        return response

    @app.exception_handler(SelfRewardError)
    async def user_error(request: Request, exc: SelfRewardError) -> JSONResponse:
        if isinstance(exc, NotAllowed):
            status = 403
        else:
            status = 400 if isinstance(exc, ConfigError | InputError) else 502
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        dependencies=[Depends(authorize)],
        responses={**ERRORS, 400: {"description": "a bad spec or setting, or a body that is not JSON"}},
    )
    async def score(body: ScoreRequest) -> ScoreResponse:
        samples = (
            1
            if (body.mode or settings.config.judge.mode) == "logprob"
            else (body.samples or settings.config.judge.samples)
        )
        if samples * len(body.responses) > MAX_VERDICTS:
            raise HTTPException(
                422,
                f"{len(body.responses)} responses x {samples} samples is more than {MAX_VERDICTS} verdicts "
                "per request: split the request",
            )
        judge = await pool.get(body.judge, body.mode)
        results = await judge.score(body.instruction, body.responses, body.samples)
        return ScoreResponse(
            judge=judge.name, mode=judge.mode, template_sha256=judge.template.sha256, results=results
        )

    @app.post(
        "/v1/compare",
        response_model=CompareResult,
        dependencies=[Depends(authorize)],
        responses={**ERRORS, 400: {"description": "a bad spec or setting, or a body that is not JSON"}},
    )
    async def compare(body: CompareRequest) -> CompareResult:
        judge = await pool.get(body.judge, body.mode)
        return await judge.compare(body.instruction, body.response_a, body.response_b)

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        return {
            "status": "ok",
            "version": __version__,
            "default_judge": settings.default_judge,
            "cache": pool.cache.status(),
            "judges": len(pool),
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
