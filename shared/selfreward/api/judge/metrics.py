"""Prometheus metrics of the judge service (one registry per app, served at GET /metrics).

`selfreward_judge_in_flight` (the /v1/score and /v1/compare requests being answered now) is what
the judge's HorizontalPodAutoscaler scales on, per pod (k8s/base/judge.yaml, docs/deployment.md).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from selfreward.judging import JudgeObserver
from selfreward.llm.retry import HTTPStatusError

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class JudgeMetrics(JudgeObserver):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "selfreward_judge_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "selfreward_judge_request_latency_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "selfreward_judge_in_flight",
            "judging requests (/v1/score, /v1/compare) being answered now: the autoscaling signal",
            registry=r,
        )
        self.cache_hits = Counter("selfreward_judge_cache_hits", "verdicts served from the cache", registry=r)
        self.cache_misses = Counter(
            "selfreward_judge_cache_misses", "verdicts that needed a model call", registry=r
        )
        self.failures = Counter(
            "selfreward_judge_verdict_failures", "verdicts without a score, by kind", ["kind"], registry=r
        )
        self.backend_calls = Counter(
            "selfreward_judge_backend_calls",
            "model calls by backend and outcome",
            ["backend", "outcome"],
            registry=r,
        )
        self.backend_latency = Histogram(
            "selfreward_judge_backend_latency_seconds",
            "model call latency",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_errors = Counter(
            "selfreward_judge_cache_errors",
            "verdict cache lookups or writes that failed (the request was judged without the cache)",
            registry=r,
        )
        self.retries = Counter(
            "selfreward_judge_backend_retries",
            "retried model calls by reason",
            ["backend", "reason"],
            registry=r,
        )

    def cache_error(self, exc: BaseException) -> None:
        self.cache_errors.inc()

    # JudgeObserver hooks

    def cache(self, hits: int, misses: int) -> None:
        if hits:
            self.cache_hits.inc(hits)
        if misses:
            self.cache_misses.inc(misses)

    def failure(self, kind: str) -> None:
        self.failures.labels(kind=kind).inc()

    def backend_call(self, backend: str, seconds: float, ok: bool) -> None:
        self.backend_calls.labels(backend=backend, outcome="ok" if ok else "error").inc()
        self.backend_latency.labels(backend=backend).observe(seconds)

    def retry(self, backend: str, exc: BaseException) -> None:
        reason = f"http_{exc.status}" if isinstance(exc, HTTPStatusError) else type(exc).__name__
        self.retries.labels(backend=backend, reason=reason).inc()
