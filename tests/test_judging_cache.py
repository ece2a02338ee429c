"""The verdict cache in a real Redis: a repeated request costs no model call, across judge restarts."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from selfreward.config import JudgeConfig, TeacherConfig
from selfreward.judging import make_judge
from selfreward.judging.cache import KEY_PREFIX
from selfreward.prompts import load_template
from selfreward.testing.fake_gemini import FakeGemini, fake_gemini


@pytest.fixture(scope="module")
def gemini_server() -> Iterator[FakeGemini]:
    with fake_gemini(api_key="k") as fake:
        yield fake


@pytest.fixture()
def fake(gemini_server: FakeGemini, monkeypatch: pytest.MonkeyPatch) -> FakeGemini:
    monkeypatch.setenv("GEMINI_API_KEY", "k")
    gemini_server.reset()
    return gemini_server


def run_score(fake: FakeGemini, redis_url: str | None, responses: list[str], samples: int = 3, **cfg: Any):
    async def go() -> Any:
        judge = make_judge(
            "gemini:g",
            JudgeConfig(**cfg),
            teacher=TeacherConfig(gemini_base_url=fake.base_url),
            redis_url=redis_url,
        )
        try:
            return await judge.score("What is Redis?", responses, samples)
        finally:
            await judge.aclose()

    return asyncio.run(go())


def test_redis_cache_survives_a_judge_restart(fake: FakeGemini, redis_url: str, redis_conn: Any) -> None:
    first = run_score(fake, redis_url, ["An in-memory store.", "A fish."])
    assert fake.calls == 6 and all(r.cached == 0 for r in first)
    keys = redis_conn.keys(KEY_PREFIX + "*")
    assert len(keys) == 6 and all(redis_conn.ttl(k) == -1 for k in keys)
    # a new judge (as after a restart of the process) with the same Redis: no model call
    again = run_score(fake, redis_url, ["An in-memory store.", "A fish."])
    assert fake.calls == 6 and [r.cached for r in again] == [3, 3]
    assert [r.model_dump(exclude={"cached"}) for r in again] == [
        r.model_dump(exclude={"cached"}) for r in first
    ]
    # asking for more samples computes only the missing ones (sample index is part of the key)
    more = run_score(fake, redis_url, ["An in-memory store."], samples=5)
    assert fake.calls == 8 and more[0].cached == 3 and len(more[0].verdicts) == 5


def test_any_change_of_parameters_or_template_misses(
    fake: FakeGemini, redis_url: str, redis_conn: Any, tmp_path: Path
) -> None:
    run_score(fake, redis_url, ["x"], samples=1)
    assert fake.calls == 1
    run_score(fake, redis_url, ["x"], samples=1, temperature=0.2)
    assert fake.calls == 2
    edited = tmp_path / "judge.txt"
    edited.write_text(load_template("builtin:yuan2024-additive").text + "\nBe strict.")
    [res] = run_score(fake, redis_url, ["x"], samples=1, template=str(edited))
    assert fake.calls == 3 and res.template_sha256 == load_template(str(edited)).sha256
    run_score(fake, redis_url, ["x"], samples=1, template=str(edited))
    assert fake.calls == 3


def test_unparseable_verdicts_are_cached_as_failures(
    fake: FakeGemini, redis_url: str, redis_conn: Any
) -> None:
    fake.reply = lambda m, p, b: "I cannot decide."
    try:
        [first] = run_score(fake, redis_url, ["x"], samples=2)
        [again] = run_score(fake, redis_url, ["x"], samples=2)
    finally:
        fake.reply = lambda m, p, b: "Score: 3"
    assert first.score is None and first.failures == 2 and first.verdicts[0].failure == "no_score"
    assert again.cached == 2 and again.verdicts[0].text == "I cannot decide." and fake.calls == 2


def test_ttl_and_disabled_and_in_process_cache(fake: FakeGemini, redis_url: str, redis_conn: Any) -> None:
    run_score(fake, redis_url, ["x"], samples=1, cache_ttl_s=300)
    [key] = redis_conn.keys(KEY_PREFIX + "*")
    assert 0 < redis_conn.ttl(key) <= 300
    run_score(fake, redis_url, ["y"], samples=1, cache=False)
    run_score(fake, redis_url, ["y"], samples=1, cache=False)
    assert fake.calls == 3 and len(redis_conn.keys(KEY_PREFIX + "*")) == 1

    async def twice() -> list[int]:
        judge = make_judge("gemini:g", JudgeConfig(), teacher=TeacherConfig(gemini_base_url=fake.base_url))
        try:
            a = await judge.score("q", ["z"], 2)
            b = await judge.score("q", ["z"], 2)
            return [a[0].cached, b[0].cached]
        finally:
            await judge.aclose()

    assert asyncio.run(twice()) == [0, 2]  # no Redis: an in-process cache per judge
    assert fake.calls == 5
