"""The Gemini backend through google-genai against a local server speaking generateContent's wire format:
retries (429 + Retry-After, RetryInfo, 5xx, malformed bodies), limits, blocking, keys, logprob mode,
the pairwise position swap, truncation."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from selfreward.config import JudgeConfig, TeacherConfig
from selfreward.errors import ConfigError
from selfreward.judging import TRUNCATION_MARK, make_judge
from selfreward.testing.fake_gemini import FakeGemini, fake_gemini

KEY = "test-key-5f2c9a"


@pytest.fixture(scope="module")
def gemini_server() -> Iterator[FakeGemini]:
    with fake_gemini(api_key=KEY) as fake:
        yield fake


@pytest.fixture()
def fake(gemini_server: FakeGemini, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGemini]:
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    gemini_server.reset()
    gemini_server.reply = lambda model, prompt, body: "Relevant and mostly complete.\nScore: 4"
    gemini_server.delay_s = 0.0
    yield gemini_server
    gemini_server.wait_idle()
    gemini_server.reset()


def judge_for(fake: FakeGemini, redis_url: str | None = None, **judge: Any):
    cfg = JudgeConfig(**{"initial_backoff_s": 0.01, "max_retries": 3, **judge})
    return make_judge(
        "gemini:gemini-test", cfg, teacher=TeacherConfig(gemini_base_url=fake.base_url), redis_url=redis_url
    )


async def _score(
    fake: FakeGemini, instruction: str, responses: list[str], samples: int | None = None, **cfg: Any
):
    judge = judge_for(fake, **cfg)
    try:
        return await judge.score(instruction, responses, samples)
    finally:
        await judge.aclose()


def test_sample_mode_wire_format_and_mean(fake: FakeGemini) -> None:
    replies = iter(["ok\nScore: 2", "fine\nScore: 4", "meh\nScore: five"])
    fake.reply = lambda model, prompt, body: next(replies)
    # one at a time: the replies go to the samples in order (three identical requests in flight
    # at once reach the server in any order)
    [res] = asyncio.run(
        _score(fake, "Explain DNS.", ["DNS maps names to addresses."], samples=3, concurrency=1)
    )
    assert [v.score for v in res.verdicts] == [2.0, 4.0, None]
    assert res.score == 3.0 and res.failures == 1
    assert res.verdicts[2].failure == "not_a_number" and res.verdicts[2].text == "meh\nScore: five"
    assert res.judge == "gemini:gemini-test" and res.mode == "sample" and len(res.template_sha256) == 64
    seen = fake.requests[0]
    assert seen.model == "gemini-test" and seen.key_ok
    assert seen.body["generationConfig"]["temperature"] == 0.7
    assert seen.body["generationConfig"]["maxOutputTokens"] == 256
    text = seen.body["contents"][0]["parts"][0]["text"]
    assert "DNS maps names to addresses." in text and "Score: <total points>" in text


def test_429_retry_after_header_is_honoured(fake: FakeGemini) -> None:
    fake.fail_next(429, times=1, retry_after="1")
    started = time.monotonic()
    [res] = asyncio.run(_score(fake, "q", ["a"], samples=1))
    assert time.monotonic() - started >= 1.0  # the backoff alone would wait about 0.01 s
    assert res.score == 4.0 and fake.calls == 2


def test_429_retry_info_delay_is_honoured(fake: FakeGemini) -> None:
    fake.fail_next(429, times=1, retry_delay="1s")
    started = time.monotonic()
    [res] = asyncio.run(_score(fake, "q", ["a"], samples=1))
    assert time.monotonic() - started >= 1.0
    assert res.score == 4.0 and fake.calls == 2


def test_5xx_and_malformed_bodies_are_retried(fake: FakeGemini) -> None:
    fake.fail_next(503, times=1)
    fake.malformed_next(times=1)
    fake.fail_next(500, times=1)
    [res] = asyncio.run(_score(fake, "q", ["a"], samples=1))
    assert res.score == 4.0 and fake.calls == 4


def test_timeouts_are_retried(fake: FakeGemini) -> None:
    fake.slow_next(2.0, times=1)
    started = time.monotonic()
    [res] = asyncio.run(_score(fake, "q", ["a"], samples=1, timeout_s=0.5))
    assert res.score == 4.0 and fake.calls == 2
    assert time.monotonic() - started < 1.8  # the slow answer was not waited for


def test_exhausted_retries_are_failures_not_scores_and_not_cached(fake: FakeGemini) -> None:
    fake.malformed_next(times=2)

    async def go() -> tuple[Any, Any]:
        judge = judge_for(fake, max_retries=1)
        try:
            first = await judge.score("q", ["a"], samples=1)
            second = await judge.score("q", ["a"], samples=1)
            return first[0], second[0]
        finally:
            await judge.aclose()

    first, second = asyncio.run(go())
    assert first.score is None and first.failures == 1
    assert first.verdicts[0].failure.startswith("backend_error: HTTP 502: malformed response body")
    assert second.score == 4.0 and second.cached == 0  # the failure was not cached: asked again
    assert fake.calls == 3


def test_blocked_prompt_is_a_failure(fake: FakeGemini) -> None:
    fake.block_next(times=1, reason="SAFETY")
    [res] = asyncio.run(_score(fake, "q", ["a"], samples=1))
    assert res.score is None and res.verdicts[0].failure == "blocked: SAFETY"


def test_rejected_key_stops_at_once_and_is_never_logged(
    fake: FakeGemini, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bad = "wrong-key-77d1e0"
    monkeypatch.setenv("GEMINI_API_KEY", bad)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigError, match="API_KEY_INVALID") as err:
        asyncio.run(_score(fake, "q", ["a"], samples=2))
    assert bad not in str(err.value) and bad not in caplog.text and KEY not in caplog.text
    assert all(not r.key_ok for r in fake.requests)


def test_missing_key_is_a_config_error(fake: FakeGemini, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMINI_API_KEY")
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="GEMINI_API_KEY"):
        judge_for(fake)


def test_concurrency_is_bounded_per_backend(fake: FakeGemini) -> None:
    fake.delay_s = 0.2
    results = asyncio.run(_score(fake, "q", [f"answer {i}" for i in range(6)], samples=1, concurrency=2))
    assert all(r.score == 4.0 for r in results)
    assert fake.calls == 6 and fake.max_in_flight == 2


def test_two_judges_share_one_concurrency_limit_through_redis(
    fake: FakeGemini, redis_url: str, redis_conn: Any
) -> None:
    """Two judges of one backend (as two replicas or workers would build them) with one Redis draw
    on one budget: 2 in flight together, where each alone would send 2."""
    fake.delay_s = 0.2

    async def go(url: str | None) -> None:
        judges = [judge_for(fake, url, concurrency=2, cache=False) for _ in range(2)]
        try:
            results = await asyncio.gather(
                *(j.score("q", [f"judge {i} answer {k}" for k in range(4)], 1) for i, j in enumerate(judges))
            )
            assert all(r.score == 4.0 for rs in results for r in rs)
        finally:
            for j in judges:
                await j.aclose()

    asyncio.run(go(redis_url))
    assert fake.calls == 8 and fake.max_in_flight == 2
    fake.reset()
    asyncio.run(go(None))
    assert fake.calls == 8 and fake.max_in_flight == 4  # in-process limits: each judge its own


def test_429_backs_off_with_shared_limits_and_each_attempt_takes_a_slot(
    fake: FakeGemini, redis_url: str, redis_conn: Any
) -> None:
    fake.fail_next(429, times=1, retry_after="1")

    async def go() -> Any:
        judge = judge_for(fake, redis_url, requests_per_minute=100, cache=False)
        try:
            return await judge.score("q", ["a"], samples=1)
        finally:
            await judge.aclose()

    started = time.monotonic()
    [res] = asyncio.run(go())
    assert time.monotonic() - started >= 1.0 and res.score == 4.0 and fake.calls == 2
    prefix = f"selfreward:limits:v1:{{gemini:gemini-test@{fake.base_url}}}"
    assert redis_conn.zcard(f"{prefix}:requests") == 2  # the retry was counted when sent
    assert redis_conn.zcard(f"{prefix}:leases") == 0


def test_reported_tokens_count_in_the_shared_window(
    fake: FakeGemini, redis_url: str, redis_conn: Any
) -> None:
    async def go() -> None:
        judge = judge_for(fake, redis_url, tokens_per_minute=100_000, cache=False)
        try:
            await judge.score("q", ["a", "b"], samples=1)
        finally:
            await judge.aclose()

    asyncio.run(go())
    key = f"selfreward:limits:v1:{{gemini:gemini-test@{fake.base_url}}}:tokens"
    counts = [int(m.rsplit(b":", 1)[1]) for m in redis_conn.zrange(key, 0, -1)]
    assert len(counts) == fake.calls == 2 and all(c > 10 for c in counts)  # prompt + verdict tokens


def test_requests_per_minute_limit(fake: FakeGemini) -> None:
    async def go() -> int:
        judge = judge_for(fake, requests_per_minute=2)
        try:
            task = asyncio.ensure_future(judge.score("q", ["a", "b", "c"], samples=1))
            await asyncio.sleep(1.5)
            calls = fake.calls  # the third request waits for the 60 s window
            assert not task.done()
            task.cancel()
            return calls
        finally:
            await judge.aclose()

    assert asyncio.run(go()) == 2


def test_logprob_mode_reads_the_score_position(fake: FakeGemini) -> None:
    [res] = asyncio.run(_score(fake, "q", ["a"], mode="logprob"))
    gen = fake.requests[0].body["generationConfig"]
    assert gen["responseLogprobs"] is True and gen["logprobs"] == 20 and gen["temperature"] == 0.0
    # the fake offers 3: 0.7, 4: 0.15, 2: 0.1, 5: 0.03 (the chosen token "4" keeps its own -0.1 only if absent)
    probs = {"3": 0.7, "4": 0.15, "2": 0.1, "5": 0.03}
    total = sum(probs.values())
    expected = sum(int(d) * p for d, p in probs.items()) / total
    assert res.score == pytest.approx(expected)
    assert res.verdicts[0].model_extra["source"] == "verdict"
    assert res.verdicts[0].model_extra["digit_mass"] == pytest.approx(total)


def test_logprob_prefill_on_gemini_is_a_config_error(fake: FakeGemini) -> None:
    with pytest.raises(ConfigError, match="prefill"):
        judge_for(fake, mode="logprob", logprob_source="prefill")


def test_long_responses_are_truncated_and_flagged(fake: FakeGemini) -> None:
    long = "token " * 400
    [res, short] = asyncio.run(_score(fake, "q", [long, "brief"], samples=1, max_response_chars=200))
    assert res.truncated and not short.truncated
    sent = [r.body["contents"][0]["parts"][0]["text"] for r in fake.requests]
    cut = next(t for t in sent if TRUNCATION_MARK in t)
    assert "<response>" + ("token " * 33).rstrip() + TRUNCATION_MARK + "</response>" in cut


def test_compare_position_swap(fake: FakeGemini) -> None:
    def prefers_good(model: str, prompt: str, body: dict[str, Any]) -> str:
        first = prompt.split('"output": """', 1)[1]
        return "m" if first.startswith("good") else "M"

    async def go(reply: Any, mode: str = "sample") -> Any:
        fake.reply = reply
        judge = judge_for(fake, mode=mode)
        try:
            return (
                await judge.compare("Say hi.", "good: hello!", "bad: go away"),
                await judge.compare("Say hi.", "bad: go away", "good: hello!"),
            )
        finally:
            await judge.aclose()

    a_better, b_better = asyncio.run(go(prefers_good))
    assert (a_better.preference, b_better.preference) == (1.0, 0.0)
    assert (a_better.ab.winner, a_better.ba.winner) == ("A", "A") and a_better.failure is None
    # compare(b, a) reuses compare(a, b)'s two verdicts from the cache
    assert b_better.ab.cached and b_better.ba.cached
    # a judge that always names the first output disagrees with itself across orders: a tie
    fake.reset()
    biased, _ = asyncio.run(go(lambda m, p, b: "m"))
    assert biased.preference == 0.5 and biased.failure is None
    assert (biased.ab.winner, biased.ba.winner) == ("A", "B")
    # logprob mode: the identifiers' probability mass, same tie rule
    fake.reset()
    lp_biased, _ = asyncio.run(go(lambda m, p, b: "m", mode="logprob"))
    assert lp_biased.preference == 0.5 and lp_biased.ab.p_a == pytest.approx(1.0)
    fake.reset()
    lp_good, lp_bad = asyncio.run(go(prefers_good, mode="logprob"))
    assert lp_good.preference == pytest.approx(1.0) and lp_bad.preference == pytest.approx(0.0)
    # an unparseable order is a failure, reported as such (preference 0.5, never a win)
    fake.reset()
    broken, _ = asyncio.run(go(lambda m, p, b: "Model m is better"))
    assert broken.preference == 0.5 and broken.failure == "ab: unparseable; ba: unparseable"
