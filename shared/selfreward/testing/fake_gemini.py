"""A local stand-in for Google's Gemini API (generateContent), speaking its REST wire format.

Gemini cannot be reached from CI, so tests point google-genai at this server:

    with fake_gemini(api_key="test-key") as fake:
        client = genai.Client(api_key="test-key", http_options=types.HttpOptions(
            base_url=fake.base_url, api_version="v1beta"))

It serves POST /<version>/models/<model>:generateContent with camelCase JSON
(`candidates[].content.parts[].text`, `finishReason`, `usageMetadata`, and `logprobsResult`
with `topCandidates`/`chosenCandidates` when `generationConfig.responseLogprobs` is set), and
Google's error bodies ({"error": {"code", "message", "status", "details"}}).

Knobs (thread-safe; set them between or during requests):
- `reply`: function (model, prompt text, request body) -> text; default "Score: 3";
- `digit_logprobs`: the top candidates offered at a position whose chosen token is a digit;
- `fail_next(status, times, retry_after=..., retry_delay=...)`: the next `times` requests get
  that error (429 with a Retry-After header and/or RetryInfo retryDelay, 500, 503, ...);
- `malformed_next(times)`: the next requests get HTTP 200 with a body that is not JSON;
- `block_next(times, reason)`: the prompt is blocked (no candidates, promptFeedback);
- `slow_next(seconds, times)`: the next requests answer only after `seconds` (client timeouts);
- `delay_s`: seconds each request takes (to observe concurrency);
- `quota_rpm`, `quota_window_s`: a hard quota as a provider enforces it: a request arriving
  while `quota_rpm` requests were accepted in the last `quota_window_s` (60) seconds gets 429
  RESOURCE_EXHAUSTED with a Retry-After header and is not served;
- `api_key`: when set, other keys get Google's 400 API_KEY_INVALID.
Observations: `requests` (model, body, whether the key matched, arrival time), `max_in_flight`,
`over_quota` (429s sent for the quota), `peak_in_window` (most requests accepted in any window).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from selfreward.testing.servers import free_port, wait_port

TOKEN = re.compile(r"\s+|\w+|[^\w\s]")
ReplyFn = Callable[[str, str, dict[str, Any]], str]


def default_reply(model: str, prompt: str, body: dict[str, Any]) -> str:
    return "The response is relevant and partly answers the question.\nScore: 3"


@dataclass
class _Scripted:
    kind: str  # "error" | "malformed" | "block" | "slow"
    status: int = 200
    delay_s: float = 0.0
    retry_after: str | None = None
    retry_delay: str | None = None
    reason: str = "SAFETY"


@dataclass
class SeenRequest:
    model: str
    body: dict[str, Any]
    key_ok: bool
    at: float


@dataclass
class FakeGemini:
    base_url: str = ""
    api_key: str | None = None
    reply: ReplyFn = default_reply
    digit_logprobs: dict[str, float] = field(
        default_factory=lambda: {
            t: math.log(p) for t, p in (("3", 0.7), ("4", 0.15), ("2", 0.1), ("5", 0.03))
        }
    )
    delay_s: float = 0.0
    quota_rpm: int | None = None
    quota_window_s: float = 60.0
    requests: list[SeenRequest] = field(default_factory=list)
    max_in_flight: int = 0
    over_quota: int = 0
    peak_in_window: int = 0
    _accepted: deque[float] = field(default_factory=deque)
    _in_flight: int = 0
    _script: list[_Scripted] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------ knobs

    def fail_next(
        self, status: int, times: int = 1, retry_after: str | None = None, retry_delay: str | None = None
    ) -> None:
        with self._lock:
            self._script += [
                _Scripted("error", status, retry_after=retry_after, retry_delay=retry_delay)
                for _ in range(times)
            ]

    def malformed_next(self, times: int = 1) -> None:
        with self._lock:
            self._script += [_Scripted("malformed") for _ in range(times)]

    def slow_next(self, seconds: float, times: int = 1) -> None:
        """The next requests answer normally but only after `seconds` (to trigger client timeouts)."""
        with self._lock:
            self._script += [_Scripted("slow", delay_s=seconds) for _ in range(times)]

    def block_next(self, times: int = 1, reason: str = "SAFETY") -> None:
        with self._lock:
            self._script += [_Scripted("block", reason=reason) for _ in range(times)]

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Wait until no request is being answered (e.g. one a client gave up on)."""
        deadline = time.monotonic() + timeout_s
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.02)

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self.requests.clear()
            self.max_in_flight = 0
            self.over_quota = 0
            self.peak_in_window = 0
            self._accepted.clear()

    def _over_quota(self, now: float) -> float | None:
        """Seconds until the quota admits a request arriving at `now` (None: admitted, counted)."""
        if self.quota_rpm is None:
            return None
        while self._accepted and now - self._accepted[0] >= self.quota_window_s:
            self._accepted.popleft()
        if len(self._accepted) >= self.quota_rpm:
            self.over_quota += 1
            return self.quota_window_s - (now - self._accepted[0])
        self._accepted.append(now)
        self.peak_in_window = max(self.peak_in_window, len(self._accepted))
        return None

    @property
    def calls(self) -> int:
        return len(self.requests)

    # ------------------------------------------------------------ wire format

    def _response(self, model: str, text: str, body: dict[str, Any]) -> dict[str, Any]:
        gen = body.get("generationConfig") or {}
        tokens = TOKEN.findall(text)
        candidate: dict[str, Any] = {
            "content": {"parts": [{"text": text}], "role": "model"},
            "finishReason": "STOP",
            "index": 0,
        }
        if gen.get("responseLogprobs"):
            k = int(gen.get("logprobs") or 1)
            chosen, top = [], []
            for tok in tokens:
                if tok.strip().isdigit():
                    offered = dict(self.digit_logprobs)
                    offered.setdefault(tok, -0.1)
                else:
                    offered = {tok: -0.05, "...": -4.0}
                ranked = sorted(offered.items(), key=lambda kv: -kv[1])[:k]
                chosen.append({"token": tok, "logProbability": offered[tok]})
                top.append({"candidates": [{"token": t, "logProbability": lp} for t, lp in ranked]})
            candidate["logprobsResult"] = {"topCandidates": top, "chosenCandidates": chosen}
            candidate["avgLogprobs"] = sum(c["logProbability"] for c in chosen) / max(len(chosen), 1)
        prompt_tokens = sum(
            len(TOKEN.findall(p.get("text", "")))
            for c in body.get("contents", [])
            for p in c.get("parts", [])
        )
        return {
            "candidates": [candidate],
            "usageMetadata": {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": len(tokens),
                "totalTokenCount": prompt_tokens + len(tokens),
            },
            "modelVersion": model,
            "responseId": f"fake-{len(self.requests)}",
        }


def _error_body(
    code: int, status: str, message: str, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status, "details": details or []}}


_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _build_app(fake: FakeGemini) -> FastAPI:
    app = FastAPI()

    @app.post("/{version}/models/{target}")
    async def generate(version: str, target: str, request: Request) -> Response:
        model, _, method = target.partition(":")
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return JSONResponse(_error_body(400, "INVALID_ARGUMENT", "Invalid JSON payload received."), 400)
        with fake._lock:
            now = time.time()
            wait = fake._over_quota(time.monotonic())
            if wait is not None:
                return JSONResponse(
                    _error_body(429, "RESOURCE_EXHAUSTED", "Quota exceeded (requests per minute)."),
                    429,
                    {"Retry-After": str(max(1, math.ceil(wait)))},
                )
            fake.requests.append(SeenRequest(model, body, fake.api_key is None or key == fake.api_key, now))
            scripted = fake._script.pop(0) if fake._script else None
            fake._in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake._in_flight)
        try:
            if fake.delay_s or (scripted is not None and scripted.kind == "slow"):
                await asyncio.sleep(fake.delay_s + (scripted.delay_s if scripted is not None else 0.0))
            if method != "generateContent":
                return JSONResponse(_error_body(404, "NOT_FOUND", f"Method {method} not found."), 404)
            if fake.api_key is not None and key != fake.api_key:
                details = [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                    }
                ]
                return JSONResponse(
                    _error_body(
                        400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", details
                    ),
                    400,
                )
            if scripted is not None and scripted.kind == "error":
                details = []
                if scripted.retry_delay is not None:
                    details.append(
                        {
                            "@type": "type.googleapis.com/google.rpc.RetryInfo",
                            "retryDelay": scripted.retry_delay,
                        }
                    )
                headers = {"Retry-After": scripted.retry_after} if scripted.retry_after is not None else None
                status = _STATUS_NAMES.get(scripted.status, "UNKNOWN")
                return JSONResponse(
                    _error_body(scripted.status, status, f"injected {status}", details),
                    scripted.status,
                    headers,
                )
            if scripted is not None and scripted.kind == "malformed":
                return Response(
                    '{"candidates": [{"content": {"parts": [{"te', 200, media_type="application/json"
                )
            if scripted is not None and scripted.kind == "block":
                return JSONResponse(
                    {
                        "promptFeedback": {"blockReason": scripted.reason},
                        "modelVersion": model,
                        "responseId": "blocked",
                    }
                )
            prompt = "".join(p.get("text", "") for c in body.get("contents", []) for p in c.get("parts", []))
            text = fake.reply(model, prompt, body)
            return JSONResponse(fake._response(model, text, body))
        finally:
            with fake._lock:
                fake._in_flight -= 1

    return app


@contextmanager
def fake_gemini(api_key: str | None = None, reply: ReplyFn | None = None) -> Iterator[FakeGemini]:
    """Run the fake on a free loopback port in a thread; yield it (base_url set)."""
    import uvicorn

    fake = FakeGemini(api_key=api_key, reply=reply or default_reply)
    port = free_port()
    fake.base_url = f"http://127.0.0.1:{port}"
    server = uvicorn.Server(
        uvicorn.Config(_build_app(fake), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, name="fake-gemini", daemon=True)
    thread.start()
    try:
        wait_port(port, timeout_s=15)
        yield fake
    finally:
        server.should_exit = True
        thread.join(timeout=10)
