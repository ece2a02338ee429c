"""The OpenAI-compatible client's transport rules against a real scripted HTTP server on loopback:
retries with backoff on connection errors, 429 and 5xx (Retry-After honoured), none on other
4xx or on a refused adapter, bounded concurrency, timeouts. (Generation itself is tested against
the real vLLM server in test_policy_server.py.)"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from selfreward.errors import ServiceError
from selfreward.llm.openai import OpenAICompatClient
from selfreward.llm.retry import HTTPStatusError
from selfreward.testing.servers import free_port

COMPLETION = {"model": "m", "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}], "usage": {}}


class Script:
    """Responses to serve in order, per path: (status, body, headers, delay_s)."""

    def __init__(self) -> None:
        self.queue: dict[str, list[tuple[int, Any, dict[str, str], float]]] = {}
        self.requests: list[tuple[str, dict[str, Any], float]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    def add(
        self, path: str, status: int, body: Any, headers: dict[str, str] | None = None, delay: float = 0
    ) -> None:
        self.queue.setdefault(path, []).append((status, body, headers or {}, delay))


@pytest.fixture()
def scripted() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            with script.lock:
                script.requests.append((self.path, body, time.monotonic()))
                script.in_flight += 1
                script.max_in_flight = max(script.max_in_flight, script.in_flight)
                queue = script.queue.get(self.path) or [(200, COMPLETION, {}, 0.0)]
                status, payload, headers, delay = queue.pop(0) if len(queue) > 1 else queue[0]
            time.sleep(delay)
            data = json.dumps(payload).encode()
            # the request is over before its answer leaves: a client that sends its next request as
            # soon as this answer arrives must not be counted twice (the count races the write)
            with script.lock:
                script.in_flight -= 1
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", script
    finally:
        server.shutdown()
        server.server_close()


def test_5xx_then_success_is_retried(scripted: tuple[str, Script]) -> None:
    url, script = scripted
    script.add("/v1/completions", 503, {"error": "busy"})
    script.add("/v1/completions", 500, {"error": "oops"})
    script.add("/v1/completions", 200, COMPLETION)
    retries: list[BaseException] = []

    async def go() -> Any:
        async with OpenAICompatClient(
            url + "/v1", max_retries=3, initial_backoff_s=0.01, on_retry=retries.append
        ) as c:
            return await c.complete("m", "hi", max_tokens=2, seed=1)

    gen = asyncio.run(go())
    assert gen.choices[0].text == "ok" and len(script.requests) == 3
    assert [getattr(e, "status", None) for e in retries] == [503, 500]
    assert script.requests[0][1] == {"model": "m", "prompt": "hi", "n": 1, "max_tokens": 2, "seed": 1}


def test_retry_after_is_honoured(scripted: tuple[str, Script]) -> None:
    url, script = scripted
    script.add("/v1/chat/completions", 429, {"error": "slow down"}, {"Retry-After": "0.4"})
    script.add(
        "/v1/chat/completions", 200, {**COMPLETION, "choices": [{"index": 0, "message": {"content": "x"}}]}
    )

    async def go() -> Any:
        async with OpenAICompatClient(url, max_retries=2, initial_backoff_s=0.001) as c:
            return await c.chat("m", [{"role": "user", "content": "hi"}])

    assert asyncio.run(go()).choices[0].text == "x"
    (_, _, t0), (_, _, t1) = script.requests
    assert t1 - t0 >= 0.4


def test_client_errors_are_not_retried_and_name_the_server_message(scripted: tuple[str, Script]) -> None:
    url, script = scripted
    script.add("/v1/completions", 400, {"error": {"message": "max_tokens is too large"}})
    script.add("/v1/load_lora_adapter", 500, {"error": {"message": "size of tensor a (64) must match"}})

    async def go() -> tuple[HTTPStatusError, HTTPStatusError]:
        async with OpenAICompatClient(url, max_retries=4, initial_backoff_s=0.001) as c:
            with pytest.raises(HTTPStatusError) as bad:
                await c.complete("m", "hi", max_tokens=10**6)
            with pytest.raises(HTTPStatusError) as refused:
                await c.load_adapter("a", "/adapters/a")
            return bad.value, refused.value

    bad, refused = asyncio.run(go())
    assert bad.status == 400 and "max_tokens is too large" in str(bad)
    assert refused.status == 500 and "must match" in str(refused)
    assert [p for p, _, _ in script.requests] == ["/v1/completions", "/v1/load_lora_adapter"]
    assert script.requests[1][1] == {"lora_name": "a", "lora_path": "/adapters/a"}


def test_unreachable_server_fails_after_the_retries() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    retries: list[BaseException] = []

    async def go() -> None:
        async with OpenAICompatClient(
            url, max_retries=2, initial_backoff_s=0.001, on_retry=retries.append
        ) as c:
            assert await c.health() is False
            await c.complete("m", "hi")

    with pytest.raises(ServiceError, match=r"/v1/completions: unreachable after 3 attempts"):
        asyncio.run(go())
    assert len(retries) == 2


def test_concurrency_is_bounded_and_timeouts_are_retried(scripted: tuple[str, Script]) -> None:
    import asyncio

    url, script = scripted
    script.add("/v1/completions", 200, COMPLETION, delay=0.2)

    async def go() -> list[Any]:
        async with OpenAICompatClient(url, concurrency=3, max_retries=0) as c:
            return await asyncio.gather(*(c.complete("m", f"p{i}") for i in range(9)))

    assert len(asyncio.run(go())) == 9 and script.max_in_flight == 3

    script.queue["/v1/completions"] = [(200, COMPLETION, {}, 1.0), (200, COMPLETION, {}, 0.0)]
    script.requests.clear()

    async def slow() -> Any:
        async with OpenAICompatClient(url, timeout_s=0.3, max_retries=1, initial_backoff_s=0.001) as c:
            return await c.complete("m", "hi")

    assert asyncio.run(slow()).choices[0].text == "ok" and len(script.requests) == 2
