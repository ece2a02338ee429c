"""Async client for OpenAI-compatible servers: vLLM (our policy service) and any teacher.

One pooled httpx.AsyncClient per instance, a semaphore bounding requests in flight, an
optional requests-per-minute limit, and retries with exponential backoff and jitter on
connection errors, timeouts, 429 and 5xx (a server's Retry-After is honoured). Client
errors (4xx other than 408/429) are not retried: they name the request's model and the
server's message.

vLLM specifics used here: `structured_outputs` (e.g. {"regex": ...}) for constrained
decoding, runtime LoRA management under /v1/load_lora_adapter and /v1/unload_lora_adapter,
and `/health`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from selfreward.errors import ServiceError

T = TypeVar("T")
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class HTTPStatusError(ServiceError):
    def __init__(self, url: str, status: int, body: str, retry_after: float | None = None) -> None:
        self.status = status
        self.body = body
        self.retry_after = retry_after
        super().__init__(f"{url} answered HTTP {status}: {body[:500]}")


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, HTTPStatusError):
        return exc.status in RETRY_STATUS
    return isinstance(exc, httpx.TransportError | httpx.TimeoutException)


class RateLimiter:
    """Sliding-window limit of `per_minute` acquisitions in any 60 seconds."""

    def __init__(self, per_minute: int | None, window_s: float = 60.0) -> None:
        self.per_minute = per_minute
        self.window_s = window_s
        self._stamps: deque[float] = deque()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        if not self.per_minute:
            return
        async with self._lock:
            while True:
                now = time.monotonic()
                while self._stamps and now - self._stamps[0] >= self.window_s:
                    self._stamps.popleft()
                if len(self._stamps) < self.per_minute:
                    self._stamps.append(now)
                    return
                await asyncio.sleep(self.window_s - (now - self._stamps[0]))


def backoff_wait(initial: float = 0.5, maximum: float = 30.0) -> Callable[[RetryCallState], float]:
    """Exponential backoff with full jitter; a Retry-After from the server wins when longer."""

    def wait(state: RetryCallState) -> float:
        exp = min(maximum, initial * (2 ** (state.attempt_number - 1)))
        delay = random.uniform(0, exp)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, HTTPStatusError) and exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, 300.0))
        return delay

    return wait


async def with_retries(
    fn: Callable[[], Awaitable[T]],
    max_retries: int,
    on_retry: Callable[[BaseException], None] | None = None,
    initial_backoff_s: float = 0.5,
) -> T:
    """Run `fn` with the retry policy above (shared by every backend)."""

    def before_sleep(state: RetryCallState) -> None:
        if on_retry and state.outcome is not None and state.outcome.exception() is not None:
            on_retry(state.outcome.exception())  # type: ignore[arg-type]

    retrying = AsyncRetrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(max_retries + 1),
        wait=backoff_wait(initial_backoff_s),
        reraise=True,
        before_sleep=before_sleep,
    )
    async for attempt in retrying:
        with attempt:
            return await fn()
    raise AssertionError("unreachable")


@dataclass
class Choice:
    text: str
    finish_reason: str | None = None
    # per generated token: {token: logprob} of the top alternatives (None if not asked)
    top_logprobs: list[dict[str, float]] | None = None
    tokens: list[str] | None = None


@dataclass
class Generation:
    model: str
    choices: list[Choice]
    usage: dict[str, int] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def _chat_logprobs(choice: dict[str, Any]) -> tuple[list[dict[str, float]] | None, list[str] | None]:
    lp = choice.get("logprobs")
    if not lp or not lp.get("content"):
        return None, None
    tops = [{t["token"]: t["logprob"] for t in item.get("top_logprobs") or []} for item in lp["content"]]
    return tops, [item["token"] for item in lp["content"]]


def _completion_logprobs(choice: dict[str, Any]) -> tuple[list[dict[str, float]] | None, list[str] | None]:
    lp = choice.get("logprobs")
    if not lp or lp.get("top_logprobs") is None:
        return None, None
    return [dict(d or {}) for d in lp["top_logprobs"]], lp.get("tokens")


class OpenAICompatClient:
    """Client of one OpenAI-compatible server (base_url without the /v1 suffix is fine)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        concurrency: int = 16,
        requests_per_minute: int | None = None,
        timeout_s: float = 300.0,
        max_retries: int = 5,
        initial_backoff_s: float = 0.5,
        on_retry: Callable[[BaseException], None] | None = None,
    ) -> None:
        base = base_url.rstrip("/")
        self.base_url = base.removesuffix("/v1")
        self.max_retries = max_retries
        self.initial_backoff_s = initial_backoff_s
        self.on_retry = on_retry
        self._semaphore = asyncio.Semaphore(concurrency)
        self._limiter = RateLimiter(requests_per_minute)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            limits=httpx.Limits(
                max_connections=max(concurrency, 1) * 2, max_keepalive_connections=concurrency
            ),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> OpenAICompatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -------------------------------------------------------------- transport

    async def _request(self, method: str, path: str, json: Any = None, retry: bool = True) -> Any:
        async def once() -> Any:
            await self._limiter.acquire()
            async with self._semaphore:
                try:
                    resp = await self._http.request(method, path, json=json)
                except httpx.TransportError as exc:
                    if not retry:
                        raise ServiceError(f"{self.base_url}{path}: {type(exc).__name__}: {exc}") from exc
                    raise
            if resp.status_code >= 400:
                raise HTTPStatusError(
                    f"{self.base_url}{path}",
                    resp.status_code,
                    resp.text,
                    parse_retry_after(resp.headers.get("retry-after")),
                )
            if not resp.content:
                return None
            ctype = resp.headers.get("content-type", "")
            return resp.json() if "json" in ctype else resp.text

        if not retry:
            return await once()
        try:
            return await with_retries(once, self.max_retries, self.on_retry, self.initial_backoff_s)
        except httpx.TransportError as exc:
            raise ServiceError(
                f"{self.base_url}{path}: unreachable after {self.max_retries + 1} attempts "
                f"({type(exc).__name__}: {exc})"
            ) from exc

    # -------------------------------------------------------------- generation

    @staticmethod
    def _sampling(
        n: int,
        temperature: float | None,
        top_p: float | None,
        max_tokens: int | None,
        seed: int | None,
        stop: list[str] | None,
        structured: dict[str, Any] | None,
        extra: dict[str, Any] | None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"n": n}
        for key, value in (
            ("temperature", temperature),
            ("top_p", top_p),
            ("max_tokens", max_tokens),
            ("seed", seed),
            ("stop", stop),
        ):
            if value is not None:
                body[key] = value
        if structured:
            body["structured_outputs"] = structured
        if extra:
            body.update(extra)
        return body

    async def chat(
        self,
        model: str,
        messages: list[dict[str, str]],
        *,
        n: int = 1,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
        top_logprobs: int | None = None,
        structured: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Generation:
        body = {"model": model, "messages": messages}
        body.update(self._sampling(n, temperature, top_p, max_tokens, seed, stop, structured, extra))
        if top_logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = top_logprobs
        data = await self._request("POST", "/v1/chat/completions", body)
        choices = []
        for c in sorted(data.get("choices", []), key=lambda c: c.get("index", 0)):
            tops, tokens = _chat_logprobs(c)
            content = (c.get("message") or {}).get("content") or ""
            choices.append(Choice(content, c.get("finish_reason"), tops, tokens))
        return Generation(data.get("model", model), choices, data.get("usage") or {}, data)

    async def complete(
        self,
        model: str,
        prompt: str,
        *,
        n: int = 1,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
        logprobs: int | None = None,
        structured: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Generation:
        body = {"model": model, "prompt": prompt}
        body.update(self._sampling(n, temperature, top_p, max_tokens, seed, stop, structured, extra))
        if logprobs is not None:
            body["logprobs"] = logprobs
        data = await self._request("POST", "/v1/completions", body)
        choices = []
        for c in sorted(data.get("choices", []), key=lambda c: c.get("index", 0)):
            tops, tokens = _completion_logprobs(c)
            choices.append(Choice(c.get("text") or "", c.get("finish_reason"), tops, tokens))
        return Generation(data.get("model", model), choices, data.get("usage") or {}, data)

    # -------------------------------------------------------------- models and adapters

    async def models(self) -> list[dict[str, Any]]:
        data = await self._request("GET", "/v1/models")
        return list(data.get("data", []))

    async def model_names(self) -> list[str]:
        return [m["id"] for m in await self.models()]

    async def tokenize(
        self,
        model: str,
        *,
        messages: list[dict[str, str]] | None = None,
        prompt: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        add_special_tokens: bool | None = None,
    ) -> dict[str, Any]:
        """vLLM's /tokenize (a chat or a plain prompt): {"count", "max_model_len", "tokens"}."""
        body: dict[str, Any] = {"model": model}
        if messages is not None:
            body["messages"] = messages
            body["add_generation_prompt"] = add_generation_prompt
            body["continue_final_message"] = continue_final_message
        else:
            body["prompt"] = prompt or ""
        if add_special_tokens is not None:
            body["add_special_tokens"] = add_special_tokens
        return dict(await self._request("POST", "/tokenize", body))

    async def load_adapter(self, name: str, path: str) -> None:
        await self._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    async def unload_adapter(self, name: str) -> None:
        await self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name})

    async def health(self, timeout_s: float = 5.0) -> bool:
        with contextlib.suppress(httpx.HTTPError, OSError):
            resp = await self._http.get("/health", timeout=timeout_s)
            return resp.status_code == 200
        return False

    async def wait_healthy(self, timeout_s: float, interval_s: float = 1.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self.health():
                return
            await asyncio.sleep(interval_s)
        raise ServiceError(f"{self.base_url}: not healthy after {timeout_s:.0f} s")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from synchronous code (CLI commands, RQ jobs)."""
    return asyncio.run(coro)
