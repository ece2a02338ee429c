"""The judge service under hostile requests, load and Redis faults; the exact rate limit.
A real uvicorn on loopback, a real Redis, Gemini's wire format locally."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import uvicorn

from selfreward.api.judge.app import MAX_VERDICTS, JudgePool, create_app
from selfreward.api.judge.metrics import JudgeMetrics
from selfreward.api.judge.settings import JudgeSettings
from selfreward.llm.limits import Limits
from selfreward.testing.fake_gemini import FakeGemini, fake_gemini
from selfreward.testing.servers import free_port, wait_port

TOKEN = "judge-hardening"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextmanager
def judge_service(env: dict[str, str]) -> Iterator[httpx.Client]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(JudgeSettings.from_env(env)), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_port(port)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, headers=AUTH) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGemini]:
    monkeypatch.setenv("GEMINI_API_KEY", "gk")
    with fake_gemini(api_key="gk", reply=lambda m, p, b: "Fine.\nScore: 3") as server:
        yield server


def env_of(fake: FakeGemini, **more: str) -> dict[str, str]:
    return {
        "SELFREWARD_TEACHER__GEMINI_BASE_URL": fake.base_url,
        "SELFREWARD_DEFAULT_JUDGE": "gemini:gemini-test",
        "SELFREWARD_JUDGE__SAMPLES": "1",
        "SELFREWARD_API_TOKEN": TOKEN,
        "POLICY_URL": "http://127.0.0.1:9",
        **more,
    }


# ---------------------------------------------------------------- 2. only the deployment's judges


def test_judges_come_from_the_allow_list_and_the_pool_is_bounded(fake: FakeGemini) -> None:
    body = {"instruction": "Name a prime.", "responses": ["7"]}
    me = psutil.Process()
    env = env_of(fake, SELFREWARD_MAX_JUDGES="3", SELFREWARD_JUDGE__MAX_RETRIES="0")
    with judge_service(env) as client:
        r = client.post("/v1/score", json={**body, "judge": "openai:http://127.0.0.1:9/v1#m"})
        assert r.status_code == 403 and "not one this deployment allows" in r.json()["detail"]
        assert client.post("/v1/score", json=body).status_code == 200  # the default judge
        fds = me.num_fds()
        rss = me.memory_info().rss
        for i in range(150):  # distinct policy: specs (the policy service is not there: 502)
            r = client.post("/v1/score", json={**body, "judge": f"policy:m{i}"})
            assert r.status_code == 502, r.text
        assert client.get("/healthz").json()["judges"] <= 3
        assert me.num_fds() - fds < 50 and me.memory_info().rss - rss < 200 << 20


def test_an_evicted_judge_is_closed() -> None:
    async def go() -> None:
        pool = JudgePool(JudgeSettings(policy_url="http://127.0.0.1:9", max_judges=2), JudgeMetrics())
        first = await pool.get("policy:a", None)
        client = first.backend._client()  # type: ignore[attr-defined]
        await pool.get("policy:b", "logprob")
        assert not client.closed
        await pool.get("policy:c", None)
        assert pool.specs == 2 and len(pool) == 3 and client.closed  # b in two modes
        await pool.aclose()

    asyncio.run(go())


# ---------------------------------------------------------------- 6. bounded requests


def test_request_sizes_and_verdict_counts_are_bounded(fake: FakeGemini) -> None:
    with judge_service(env_of(fake)) as client:
        r = client.post("/v1/score", json={"instruction": "x" * (20 << 20), "responses": ["7"]})
        assert r.status_code == 413
        r = client.post("/v1/score", json={"instruction": "x" * 200_000, "responses": ["7"]})
        assert r.status_code == 422
        r = client.post("/v1/score", json={"instruction": "Hi", "responses": ["a"] * 100, "samples": 64})
        assert r.status_code == 422 and str(MAX_VERDICTS) in r.text
        assert fake.calls == 0  # nothing reached the teacher


# ---------------------------------------------------------------- 9-10. the cache under load and faults


def test_many_responses_with_the_redis_cache(fake: FakeGemini, redis_url: str, redis_conn: Any) -> None:
    """More concurrent cache lookups than redis-py's default pool holds: they wait for a connection."""
    body = {"instruction": "Name a prime.", "responses": [f"answer {i}" for i in range(256)]}
    with judge_service(env_of(fake, REDIS_URL=redis_url, SELFREWARD_JUDGE__CONCURRENCY="64")) as client:
        r = client.post("/v1/score", json=body)
        assert r.status_code == 200, r.text[:500]
        assert len(r.json()["results"]) == 256 and fake.calls == 256
        again = client.post("/v1/score", json=body).json()
        assert all(x["cached"] == 1 for x in again["results"]) and fake.calls == 256


def test_redis_down_the_judge_judges_without_the_cache_and_recovers(fake: FakeGemini, tmp_path: Path) -> None:
    from test_api_hardening import own_redis

    port = free_port()
    body = {"instruction": "Name a prime.", "responses": ["7", "8"]}
    env = env_of(fake, REDIS_URL=f"redis://127.0.0.1:{port}/0")
    with own_redis(tmp_path, port) as redis_proc, judge_service(env) as client:
        assert client.post("/v1/score", json=body).status_code == 200
        assert client.get("/healthz").json()["cache"]["up"] is True
        redis_proc.kill()
        redis_proc.wait()
        calls = fake.calls
        for _ in range(5):
            r = client.post("/v1/score", json=body)
            assert r.status_code == 200, r.text
        assert fake.calls == calls + 10  # judged again: no cache
        health = client.get("/healthz").json()["cache"]
        assert health["up"] is False and health["errors"] >= 1
        assert "selfreward_judge_cache_errors_total" in client.get("/metrics").text
        with own_redis(tmp_path, port):
            time.sleep(2.2)  # the cache is tried again after RETRY_AFTER_S
            codes = [client.post("/v1/score", json=body).status_code for _ in range(50)]
            assert codes == [200] * 50
            assert client.get("/healthz").json()["cache"]["up"] is True


# ---------------------------------------------------------------- 11. the rate limit counts sends


def test_the_rate_limit_counts_requests_when_they_are_sent() -> None:
    """2 requests per 0.5 s, 2 at a time: two slow requests hold both slots while four quick ones
    wait; the quick ones must still be sent at most 2 per 0.5 s."""
    sends: list[float] = []

    async def go() -> None:
        limits = Limits(2, 2, window_s=0.5)

        async def request(seconds: float) -> None:
            async with limits.slot():
                sends.append(time.monotonic())
                await asyncio.sleep(seconds)

        await asyncio.gather(*(request(s) for s in (1.0, 1.0, 0.05, 0.05, 0.05, 0.05)))

    asyncio.run(go())
    worst = max(sum(1 for s in sends if t <= s < t + 0.5) for t in sends)
    assert worst <= 2, sends
    assert os.environ.get("SELFREWARD_API_TOKEN") != TOKEN
