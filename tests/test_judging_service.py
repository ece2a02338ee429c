"""The judge service over HTTP: a real uvicorn on loopback, a real Redis, Gemini's wire format locally."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn

from selfreward.api.judge.app import create_app
from selfreward.api.judge.settings import JudgeSettings
from selfreward.testing.fake_gemini import FakeGemini, fake_gemini
from selfreward.testing.servers import free_port, wait_port

TOKEN = "service-token-1"


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
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGemini]:
    monkeypatch.setenv("GEMINI_API_KEY", "gk")
    with fake_gemini(api_key="gk") as server:
        yield server


def service_env(fake: FakeGemini, redis_url: str) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "SELFREWARD_TEACHER__GEMINI_BASE_URL": fake.base_url,
        "SELFREWARD_JUDGE__SAMPLES": "2",
        "SELFREWARD_DEFAULT_JUDGE": "gemini:gemini-test",
        "SELFREWARD_API_TOKEN": TOKEN,
    }


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series == (f"{name}{{{want}}}" if labels else name):
            return float(value)
    return 0.0


def test_score_compare_auth_cache_and_metrics(fake: FakeGemini, redis_url: str, redis_conn: Any) -> None:
    # each prompt (one response) gets "Good" then "Weak", whatever order the service's concurrent
    # requests reach the fake in
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def reply(model: str, prompt: str, body: dict[str, Any]) -> str:
        if "Best Model Identifier" in prompt:
            return "m"
        with lock:
            seen[prompt] = seen.get(prompt, 0) + 1
            return ["Good.\nScore: 5", "Weak.\nScore: 2"][(seen[prompt] - 1) % 2]

    fake.reply = reply
    body = {"instruction": "Name a prime.", "responses": ["7", "8"]}
    with judge_service(service_env(fake, redis_url)) as client:
        assert client.post("/v1/score", json=body).status_code == 401
        assert (
            client.post("/v1/score", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        )
        r = client.post("/v1/score", json=body, headers=AUTH)
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["judge"] == "gemini:gemini-test" and data["mode"] == "sample"
        assert [len(x["verdicts"]) for x in data["results"]] == [2, 2]
        for res in data["results"]:
            assert res["score"] == 3.5 and res["failures"] == 0
            assert {v["text"] for v in res["verdicts"]} == {"Good.\nScore: 5", "Weak.\nScore: 2"}
        # samples override
        r = client.post("/v1/score", json={**body, "responses": ["11"], "samples": 4}, headers=AUTH)
        assert len(r.json()["results"][0]["verdicts"]) == 4
        # compare: a first-position bias is a tie
        r = client.post(
            "/v1/compare",
            json={"instruction": "Name a prime.", "response_a": "7", "response_b": "8"},
            headers=AUTH,
        )
        assert r.status_code == 200, r.text
        assert (
            r.json()["preference"] == 0.5
            and r.json()["ab"]["winner"] == "A"
            and r.json()["ba"]["winner"] == "B"
        )
        # bad input: one clear message
        r = client.post("/v1/score", json={**body, "judge": "claude:x"}, headers=AUTH)
        assert r.status_code == 400 and "expected 'policy:<served-model>'" in r.json()["detail"]
        assert client.post("/v1/score", json={**body, "responses": []}, headers=AUTH).status_code == 422
        assert client.post("/v1/score", json={**body, "extra": 1}, headers=AUTH).status_code == 422
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and health["cache"] == {"backend": "redis", "errors": 0, "up": True}
        assert health["judges"] == 1  # how many, never which (the specs may name internal hosts)
        calls_before_restart = fake.calls
        text = client.get("/metrics").text
        assert metric(text, "selfreward_judge_requests_total", endpoint="/v1/score", status="200") == 2
        assert metric(text, "selfreward_judge_requests_total", endpoint="/v1/score", status="401") == 2
        assert metric(text, "selfreward_judge_cache_misses_total") == 10
        assert (
            metric(text, "selfreward_judge_backend_calls_total", backend="gemini:gemini-test", outcome="ok")
            == 10
        )
        assert metric(text, "selfreward_judge_request_latency_seconds_count", endpoint="/v1/compare") == 1
    # a restarted service with the same Redis answers from the cache
    with judge_service(service_env(fake, redis_url)) as client:
        r = client.post("/v1/score", json=body, headers=AUTH)
        assert [x["cached"] for x in r.json()["results"]] == [2, 2]
        assert fake.calls == calls_before_restart
        text = client.get("/metrics").text
        assert metric(text, "selfreward_judge_cache_hits_total") == 4
        assert metric(text, "selfreward_judge_cache_misses_total") == 0


def test_failures_retries_and_logprob_mode_over_http(
    fake: FakeGemini, redis_url: str, redis_conn: Any
) -> None:
    fake.reply = lambda m, p, b: "No idea, sorry."
    env = {**service_env(fake, redis_url), "SELFREWARD_JUDGE__INITIAL_BACKOFF_S": "0.01"}
    with judge_service(env) as client:
        fake.fail_next(503, times=1)
        r = client.post(
            "/v1/score", json={"instruction": "q", "responses": ["a"], "samples": 1}, headers=AUTH
        )
        res = r.json()["results"][0]
        assert res["score"] is None and res["failures"] == 1 and res["verdicts"][0]["failure"] == "no_score"
        assert res["verdicts"][0]["text"] == "No idea, sorry."
        fake.reply = lambda m, p, b: "Fine.\nScore: 3"
        r = client.post(
            "/v1/score", json={"instruction": "q", "responses": ["b"], "mode": "logprob"}, headers=AUTH
        )
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["mode"] == "logprob" and 2.0 < out["results"][0]["score"] < 4.0
        text = client.get("/metrics").text
        assert metric(text, "selfreward_judge_verdict_failures_total", kind="no_score") == 1
        assert (
            metric(
                text,
                "selfreward_judge_backend_retries_total",
                backend="gemini:gemini-test",
                reason="http_503",
            )
            == 1
        )


def test_remote_judge_speaks_the_judge_protocol(fake: FakeGemini, redis_url: str, redis_conn: Any) -> None:
    """RemoteJudge is a Judge: score and compare through the service give what an in-process
    judge of the same spec gives; a service with other templates is refused for either."""
    import asyncio

    from selfreward.config import JudgeConfig, TeacherConfig
    from selfreward.errors import ServiceError
    from selfreward.judging import CompareResult, Judge, RemoteJudge, ScoreResult, make_judge

    replies = {"7": "Prime.\nScore: 5", "8": "Not prime.\nScore: 1"}

    def reply(model: str, prompt: str, body: dict) -> str:
        if "Best Model Identifier" in prompt:  # the pairwise prompt: "m" when output_1 is the "7"
            return "m" if '"""7"""' in prompt.split('"model_identifier": "M"')[0] else "M"
        return next(v for k, v in replies.items() if f"<response>{k}</response>" in prompt)

    fake.reply = reply
    config = JudgeConfig(samples=1)
    env = {**service_env(fake, redis_url), "SELFREWARD_JUDGE__SAMPLES": "1"}
    with judge_service(env) as client:
        url = str(client.base_url)

        async def go() -> tuple[list[ScoreResult], CompareResult, str]:
            remote = RemoteJudge(url, "gemini:gemini-test", config, api_token=TOKEN)
            assert isinstance(remote, Judge) and remote.concurrency == config.concurrency
            try:
                scores = await remote.score("Name a prime.", ["7", "8"])
                comp = await remote.compare("Name a prime.", "7", "8")
                return scores, comp, remote.name
            finally:
                await remote.aclose()

        scores, comp, name = asyncio.run(go())
        assert [s.score for s in scores] == [5.0, 1.0] and name == "gemini:gemini-test"
        assert comp.preference == 1.0 and comp.ab.winner == comp.ba.winner == "A"

        async def local() -> CompareResult:
            judge = make_judge(
                "gemini:gemini-test", config, teacher=TeacherConfig(gemini_base_url=fake.base_url)
            )
            try:
                return await judge.compare("Name a prime.", "7", "8")
            finally:
                await judge.aclose()

        here = asyncio.run(local())
        assert (here.preference, here.template_sha256, here.judge) == (
            comp.preference,
            comp.template_sha256,
            comp.judge,
        )

        async def other_template(field: str) -> None:
            remote = RemoteJudge(url, "gemini:gemini-test", config.model_copy(update={field: str(template)}))
            remote._api_token = TOKEN
            try:
                if field == "template":
                    await remote.score("Name a prime.", ["7"])
                else:
                    await remote.compare("Name a prime.", "7", "8")
            finally:
                await remote.aclose()

        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            template = Path(tmp) / "t.txt"
            template.write_text("Q: {instruction}\nA: {response}\nA2: {output_1} {output_2}\nScore: N")
            for field in ("template", "compare_template"):
                with pytest.raises(ServiceError, match=f"configure the service with the run's judge.{field}"):
                    asyncio.run(other_template(field))


def test_in_flight_gauge_counts_judging_requests_while_they_run(
    fake: FakeGemini, redis_url: str, redis_conn: Any
) -> None:
    """selfreward_judge_in_flight, the judge's autoscaling signal: 1 while a slow /v1/score (or
    /v1/compare) is answered, 0 once it is done, failed or refused; other routes do not count."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    fake.reply = lambda m, p, b: "m" if "Best Model Identifier" in p else "Fine.\nScore: 4"
    env = {**service_env(fake, redis_url), "SELFREWARD_JUDGE__SAMPLES": "1"}

    def in_flight(client: httpx.Client) -> float:
        text = client.get("/metrics").text
        assert "selfreward_judge_in_flight" in text
        return metric(text, "selfreward_judge_in_flight")

    def seen_during(client: httpx.Client, path: str, body: dict[str, Any]) -> list[float]:
        """The gauge polled while one slow request to `path` runs (the backend takes 1.5 s)."""
        fake.delay_s = 1.5
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.post, path, json=body, headers=AUTH)
            seen = []
            while not pending.done():
                seen.append(in_flight(client))
                time.sleep(0.05)
            assert pending.result().status_code == 200, pending.result().text
        fake.delay_s = 0.0
        return seen

    with judge_service(env) as client:
        assert in_flight(client) == 0
        seen = seen_during(client, "/v1/score", {"instruction": "Name a prime.", "responses": ["7"]})
        assert 1 in seen and set(seen) <= {0, 1}, seen
        assert in_flight(client) == 0
        compare = {"instruction": "Name a prime.", "response_a": "7", "response_b": "9"}
        seen = seen_during(client, "/v1/compare", compare)
        assert 1 in seen and set(seen) <= {0, 1}, seen
        assert in_flight(client) == 0
        # refused requests and failed verdicts leave it at 0; health and metrics are not judging
        assert client.post("/v1/score", json={"instruction": "q", "responses": ["a"]}).status_code == 401
        r = client.post("/v1/score", json={"instruction": "q", "responses": []}, headers=AUTH)
        assert r.status_code == 422
        fake.fail_next(400, times=1)  # the backend refuses: a verdict recorded as failed
        r = client.post("/v1/score", json={"instruction": "q", "responses": ["z"]}, headers=AUTH)
        assert r.status_code == 200 and r.json()["results"][0]["failures"] == 1, r.text
        assert client.get("/healthz").status_code == 200
        assert in_flight(client) == 0


def test_default_judge_and_its_client_are_built_at_start(
    fake: FakeGemini, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first request does not pay for building the default judge (google-genai's import and
    client: 0.55 s before, 0.11 s after on this 2-core machine); no request is sent to build it; a
    default that cannot be built still lets the service start, and requests get the error."""
    from fastapi.testclient import TestClient

    app = create_app(JudgeSettings.from_env(service_env(fake, redis_url)))
    with TestClient(app):
        pool = app.state.pool
        assert pool.specs == 1
        judge = next(iter(pool._judges["gemini:gemini-test"].values()))
        assert judge.backend._state is not None  # the client, its connection pool and limits
        assert fake.calls == 0
    monkeypatch.delenv("GEMINI_API_KEY")
    app = create_app(JudgeSettings.from_env(service_env(fake, redis_url)))
    with TestClient(app) as client:
        assert app.state.pool.specs == 0
        r = client.post("/v1/score", json={"instruction": "q", "responses": ["a"]}, headers=AUTH)
        assert r.status_code == 400 and "GEMINI_API_KEY" in r.text, r.text
