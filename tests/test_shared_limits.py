"""Limits shared through Redis (selfreward.llm.limits.SharedLimits): real Redis, real processes.

Several processes draw on one backend's budget: requests per window, leases in flight, tokens
per window; a lease of a killed process comes back after its ttl; without Redis the process'
own limits hold; make_backend picks the shared limits only for a backend outside the policy
service."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import selfreward
from selfreward.config import JudgeConfig, TeacherConfig
from selfreward.llm.backend import make_backend
from selfreward.llm.limits import KEY_PREFIX, Limits, SharedLimits
from selfreward.llm.openai import usage_tokens
from selfreward.testing.servers import free_port

# One process of the tests: waits until `start_at` (wall clock), then runs `tasks` requests at
# once through one SharedLimits and prints one JSON line per request when all are done.
#   mode "lease": acquire()/release(): [granted_at (Redis' clock)]
#   mode "slot":  slot(): [start, end] (time.time() inside the slot)
#   mode "hold":  take one slot, print "held", keep it until killed
CHILD = r"""
import asyncio, json, sys, time
from selfreward.llm.limits import SharedLimits

a = json.loads(sys.argv[1])

async def main() -> None:
    limits = SharedLimits(
        a["redis_url"], a["identity"], a["concurrency"], a.get("rpm"), a.get("tpm"),
        window_s=a["window_s"], lease_ttl_s=a["lease_ttl_s"],
    )
    if a["mode"] == "hold":
        async with limits.slot():
            print("held", flush=True)
            await asyncio.sleep(3600)
    await asyncio.sleep(max(0.0, a["start_at"] - time.time()))
    rows = []

    async def lease() -> None:
        got = await limits.acquire()
        await asyncio.sleep(a["hold_s"])
        await limits.release(got)
        rows.append([got.granted_at])

    async def slot() -> None:
        async with limits.slot():
            start = time.time()
            await asyncio.sleep(a["hold_s"])
            rows.append([start, time.time()])

    one = lease if a["mode"] == "lease" else slot
    await asyncio.gather(*(one() for _ in range(a["tasks"])))
    await limits.aclose()
    for row in rows:
        print(json.dumps(row))

asyncio.run(main())
"""


def _env() -> dict[str, str]:
    """This checkout's package first, whatever the installed one is."""
    env = dict(os.environ)
    here = str(Path(selfreward.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _spawn(**args: Any) -> subprocess.Popen[str]:
    defaults: dict[str, Any] = {"window_s": 60.0, "lease_ttl_s": 120.0, "hold_s": 0.0, "tasks": 1}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps({**defaults, **args})],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )


def _run_all(procs: list[subprocess.Popen[str]], timeout_s: float = 60) -> list[list[list[float]]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout_s)
        assert p.returncode == 0, stderr
        out.append([json.loads(line) for line in stdout.splitlines() if line.strip()])
    return out


def _start_at(procs: int) -> float:
    return time.time() + 1.0 + 0.5 * procs  # room for the interpreters to start on 2 cores


def test_requests_per_window_hold_across_four_processes(redis_url: str, redis_conn: Any) -> None:
    rpm, window, procs, tasks = 5, 1.0, 4, 5
    start = _start_at(procs)
    rows = _run_all(
        [
            _spawn(
                redis_url=redis_url,
                identity="test:rpm",
                concurrency=100,
                rpm=rpm,
                window_s=window,
                mode="lease",
                tasks=tasks,
                start_at=start,
            )
            for _ in range(procs)
        ]
    )
    sends = sorted(g for per_proc in rows for (g,) in per_proc)
    assert len(sends) == procs * tasks and all(len(r) == tasks for r in rows)
    worst = max(sum(1 for s in sends if t <= s < t + window - 1e-6) for t in sends)
    assert worst <= rpm, sends
    # 20 requests at 5 per window: the last one went out at least 3 windows after the first
    assert sends[-1] - sends[0] >= (procs * tasks // rpm - 1) * window - 0.01
    assert redis_conn.zcard(f"{KEY_PREFIX}{{test:rpm}}:leases") == 0  # every lease was given back


def test_concurrency_holds_across_four_processes(redis_url: str, redis_conn: Any) -> None:
    concurrency, procs = 2, 4
    start = _start_at(procs)
    rows = _run_all(
        [
            _spawn(
                redis_url=redis_url,
                identity="test:concurrency",
                concurrency=concurrency,
                mode="slot",
                tasks=4,
                hold_s=0.15,
                start_at=start,
            )
            for _ in range(procs)
        ]
    )
    spans = [span for per_proc in rows for span in per_proc]
    assert len(spans) == 16
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    in_flight = worst = 0
    for _, step in events:
        in_flight += step
        worst = max(worst, in_flight)
    assert worst == concurrency, spans  # never more, and the slots were all used
    assert redis_conn.zcard(f"{KEY_PREFIX}{{test:concurrency}}:leases") == 0


def test_tokens_per_window_make_the_next_request_wait(redis_url: str, redis_conn: Any) -> None:
    async def go() -> tuple[float, float]:
        one = SharedLimits(redis_url, "test:tpm", 4, tokens_per_minute=100, window_s=1.0)
        other = SharedLimits(redis_url, "test:tpm", 4, tokens_per_minute=100, window_s=1.0)
        try:
            async with one.slot():
                pass
            await one.record_tokens(60)  # below the limit: no wait
            started = time.monotonic()
            async with other.slot():
                pass
            below = time.monotonic() - started
            await one.record_tokens(60)  # 120 in the window: every process waits for it to pass
            started = time.monotonic()
            async with other.slot():
                pass
            return below, time.monotonic() - started
        finally:
            await one.aclose()
            await other.aclose()

    below, above = asyncio.run(go())
    assert below < 0.5
    assert 0.7 <= above < 2.5


def test_a_request_counts_until_a_window_after_its_answer(redis_url: str, redis_conn: Any) -> None:
    """rpm 1 in a 1 s window: a request answered after 0.6 s holds the window until 1.6 s after
    it was sent (the backend counts at arrival, which is after our count: measured over quota
    otherwise), not 1 s."""

    async def go() -> float:
        one = SharedLimits(redis_url, "test:ends", 4, 1, window_s=1.0)
        other = SharedLimits(redis_url, "test:ends", 4, 1, window_s=1.0)
        try:
            started = time.monotonic()
            async with one.slot():
                await asyncio.sleep(0.6)
            async with other.slot():
                return time.monotonic() - started
        finally:
            await one.aclose()
            await other.aclose()

    assert 1.55 <= asyncio.run(go()) < 3.0


def test_a_killed_process_gives_its_slot_back_after_the_lease_ttl(redis_url: str, redis_conn: Any) -> None:
    holder = _spawn(
        redis_url=redis_url, identity="test:killed", concurrency=1, mode="hold", lease_ttl_s=1.5, start_at=0
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"

        async def go() -> tuple[bool, float]:
            limits = SharedLimits(redis_url, "test:killed", 1, lease_ttl_s=1.5)
            try:
                # the holder renews its lease (every ttl/3): its slot stays taken while it lives
                try:
                    await asyncio.wait_for(limits.acquire(), timeout=2.5)
                    blocked = False
                except TimeoutError:
                    blocked = True
                holder.send_signal(signal.SIGKILL)
                holder.wait(timeout=10)
                started = time.monotonic()
                async with limits.slot():
                    waited = time.monotonic() - started
                return blocked, waited
            finally:
                await limits.aclose()

        blocked, waited = asyncio.run(go())
        assert blocked, "the holder's lease expired while it was alive (not renewed)"
        assert waited < 3.0  # its lease expired after its 1.5 s ttl
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)


def test_without_redis_the_process_limits_hold(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> tuple[list[float], int]:
        limits = SharedLimits(f"redis://127.0.0.1:{free_port()}/0", "test:down", 1, 2, window_s=0.5)
        sends: list[float] = []
        try:
            for _ in range(3):
                async with limits.slot():
                    sends.append(time.monotonic())
            return sends, limits.errors
        finally:
            await limits.aclose()

    sends, errors = asyncio.run(go())
    assert errors >= 1 and "Redis unavailable" in caplog.text
    assert sends[2] - sends[0] >= 0.45  # the third waited for the in-process window


def test_in_process_limits_count_tokens_too() -> None:
    async def go() -> float:
        limits = Limits(2, tokens_per_minute=50, window_s=0.5)
        async with limits.slot():
            pass
        await limits.record_tokens(80)
        started = time.monotonic()
        async with limits.slot():
            pass
        return time.monotonic() - started

    assert asyncio.run(go()) >= 0.4
    assert usage_tokens({"prompt_tokens": 7, "completion_tokens": 5}) == 12
    assert usage_tokens({"total_tokens": 20, "prompt_tokens": 7}) == 20
    assert usage_tokens(None) == 0 and usage_tokens({"total_tokens": True}) == 0


def test_make_backend_shares_limits_except_for_the_policy_service(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", "k")
    cfg = JudgeConfig(concurrency=3, requests_per_minute=10, tokens_per_minute=1000)
    teacher = TeacherConfig(gemini_base_url="http://127.0.0.1:9")

    async def go() -> dict[str, Any]:
        backends = {
            "gemini": make_backend("gemini:g", cfg, teacher=teacher, redis_url=redis_url),
            "openai": make_backend(
                "openai:http://teacher:8000/v1#t", cfg, teacher=teacher, redis_url=redis_url
            ),
            "policy": make_backend("policy:m1", cfg, policy_url="http://127.0.0.1:9", redis_url=redis_url),
            "embedded": make_backend("gemini:g", cfg, teacher=teacher),
        }
        limits = {
            name: (b._client()[1] if name in ("gemini", "embedded") else b._client().limits)  # type: ignore[attr-defined]
            for name, b in backends.items()
        }
        for b in backends.values():
            await b.aclose()
        return limits

    limits = asyncio.run(go())
    assert isinstance(limits["gemini"], SharedLimits) and isinstance(limits["openai"], SharedLimits)
    assert isinstance(limits["policy"], Limits) and isinstance(limits["embedded"], Limits)
    assert limits["gemini"].identity == "gemini:g@http://127.0.0.1:9"
    assert limits["openai"].identity == "openai:http://teacher:8000/v1#t"
    shared = limits["openai"]
    assert (shared.concurrency, shared.requests_per_minute, shared.tokens_per_minute) == (3, 10, 1000)
