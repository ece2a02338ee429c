"""Async client for OpenAI-compatible servers: vLLM (our policy service) and any teacher.

One pooled httpx.AsyncClient per instance, a semaphore bounding requests in flight, an
optional requests-per-minute limit, and retries with exponential backoff and jitter on
connection errors, timeouts, 429 and 5xx (a server's Retry-After is honoured). Client
errors (4xx other than 408/429) are not retried: they name the request's model and the
server's message.

vLLM specifics used here: `structured_outputs` (e.g. {"regex": ...}) for constrained
decoding (the old `guided_regex` field is silently ignored by vLLM >= 0.11), token-id prompts,
`prompt_logprobs` and `return_tokens_as_token_ids` (model fingerprints), runtime LoRA
management under /v1/load_lora_adapter and /v1/unload_lora_adapter (a failed load answers
500 and is not retried: it fails the same way again), `/tokenize` and `/health`.

Create a client inside the coroutine that uses it (its connection pool belongs to one event
loop), e.g. `run_sync(main())` with `async with OpenAICompatClient(url) as client:` in main.
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
# adapter management: a 500 there is the worker refusing the adapter (wrong shapes, bad files)
ADMIN_RETRY_STATUS = {408, 429, 502, 503, 504}


class HTTPStatusError(ServiceError):
    def __init__(self, url: str, status: int, body: str, retry_after: float | None = None) -> None:
        self.status = status
        self.body = body
        self.retry_after = retry_after
        super().__init__(f"{url} answered HTTP {status}: {body[:500]}")

    @classmethod
    def check(cls, resp: httpx.Response) -> httpx.Response:
        """`resp` unchanged, or this error (status, body, Retry-After) for a 4xx/5xx answer."""
        if resp.status_code >= 400:
            raise cls(
                str(resp.request.url),
                resp.status_code,
                resp.text,
                parse_retry_after(resp.headers.get("retry-after")),
            )
        return resp


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


def is_transient(exc: BaseException, statuses: frozenset[int] | set[int] = frozenset(RETRY_STATUS)) -> bool:
    if isinstance(exc, HTTPStatusError):
        return exc.status in statuses
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
    retry_if: Callable[[BaseException], bool] = is_transient,
) -> T:
    """Run `fn` with the retry policy above (shared by every backend)."""

    def before_sleep(state: RetryCallState) -> None:
        if on_retry and state.outcome is not None and state.outcome.exception() is not None:
            on_retry(state.outcome.exception())  # type: ignore[arg-type]

    retrying = AsyncRetrying(
        retry=retry_if_exception(retry_if),
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
    # per generated token: {token: logprob} of the top alternatives (None if not asked); with
    # return_tokens_as_token_ids the tokens read "token_id:<id>"
    top_logprobs: list[dict[str, float]] | None = None
    tokens: list[str] | None = None
    # completions with prompt_logprobs: per prompt token (None for the first) {token id: logprob}
    # of the top alternatives and the prompt's own token
    prompt_logprobs: list[dict[int, float] | None] | None = None


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


def _prompt_logprobs(choice: dict[str, Any]) -> list[dict[int, float] | None] | None:
    rows = choice.get("prompt_logprobs")
    if rows is None:
        return None
    return [
        None if row is None else {int(tok): float(v["logprob"]) for tok, v in row.items()} for row in rows
    ]


def token_id(token: str) -> int:
    """The id in a "token_id:<id>" token (vLLM's return_tokens_as_token_ids)."""
    prefix, _, value = token.partition(":")
    if prefix != "token_id" or not value.lstrip("-").isdigit():
        raise ValueError(f"not a token id: {token!r} (ask with return_tokens_as_token_ids=True)")
    return int(value)


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

    @classmethod
    def for_policy(cls, config: Any, **kwargs: Any) -> OpenAICompatClient:
        """A client of the run's policy server (services.policy_url, concurrency, request timeout)."""
        services = config.services
        options = {"concurrency": services.concurrency, "timeout_s": services.request_timeout_s, **kwargs}
        return cls(services.policy_url, **options)

    async def _request(
        self,
        method: str,
        path: str,
        json: Any = None,
        retry: bool = True,
        retry_statuses: frozenset[int] | set[int] = frozenset(RETRY_STATUS),
    ) -> Any:
        async def once() -> Any:
            await self._limiter.acquire()
            async with self._semaphore:
                try:
                    resp = await self._http.request(method, path, json=json)
                except httpx.TransportError as exc:
                    if not retry:
                        raise ServiceError(f"{self.base_url}{path}: {type(exc).__name__}: {exc}") from exc
                    raise
            HTTPStatusError.check(resp)
            if not resp.content:
                return None
            ctype = resp.headers.get("content-type", "")
            return resp.json() if "json" in ctype else resp.text

        if not retry:
            return await once()
        try:
            return await with_retries(
                once,
                self.max_retries,
                self.on_retry,
                self.initial_backoff_s,
                retry_if=lambda exc: is_transient(exc, retry_statuses),
            )
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
        return_tokens_as_token_ids: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> Generation:
        """One chat request; `n` choices. `structured`: vLLM's structured_outputs, e.g.
        {"regex": "Score: [0-5]"} or {"json": <schema>}."""
        body: dict[str, Any] = {"model": model, "messages": messages}
        body.update(self._sampling(n, temperature, top_p, max_tokens, seed, stop, structured, extra))
        if top_logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = top_logprobs
        if return_tokens_as_token_ids:
            body["return_tokens_as_token_ids"] = True
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
        prompt: str | list[int] | list[str] | list[list[int]],
        *,
        n: int = 1,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        structured: dict[str, Any] | None = None,
        return_tokens_as_token_ids: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> Generation:
        """One completion request: `prompt` is text or token ids (sent as they are, no BOS added),
        or a batch of either: choice i*n + j answers prompt i.

        `prompt_logprobs` with a LoRA adapter as `model` crashes vLLM 0.32's engine on CPU
        (vllm-project/vllm#29955): ask logprobs of generated tokens instead."""
        body: dict[str, Any] = {"model": model, "prompt": prompt}
        body.update(self._sampling(n, temperature, top_p, max_tokens, seed, stop, structured, extra))
        if logprobs is not None:
            body["logprobs"] = logprobs
        if prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs
        if return_tokens_as_token_ids:
            body["return_tokens_as_token_ids"] = True
        data = await self._request("POST", "/v1/completions", body)
        choices = []
        for c in sorted(data.get("choices", []), key=lambda c: c.get("index", 0)):
            tops, tokens = _completion_logprobs(c)
            choices.append(
                Choice(c.get("text") or "", c.get("finish_reason"), tops, tokens, _prompt_logprobs(c))
            )
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

    async def adapters(self) -> list[dict[str, Any]]:
        """The LoRA adapters the server serves (models with a parent): id, root (path), parent."""
        return [m for m in await self.models() if m.get("parent")]

    async def load_adapter(self, name: str, path: str, load_inplace: bool = False) -> None:
        """Serve the PEFT adapter at `path` (a path on the server's machine) as model `name`."""
        body: dict[str, Any] = {"lora_name": name, "lora_path": str(path)}
        if load_inplace:
            body["load_inplace"] = True
        await self._request("POST", "/v1/load_lora_adapter", body, retry_statuses=ADMIN_RETRY_STATUS)

    async def unload_adapter(self, name: str) -> None:
        await self._request(
            "POST", "/v1/unload_lora_adapter", {"lora_name": name}, retry_statuses=ADMIN_RETRY_STATUS
        )

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
