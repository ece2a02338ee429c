"""Async client of OpenAI-compatible servers: vLLM (the policy service) and any teacher.

One pooled connection (`selfreward.llm.http`), limits bounding requests in flight, per minute and
tokens per minute (`selfreward.llm.limits`: this process' `Limits` by default, or the `limits=`
given, e.g. a `SharedLimits` in Redis; each attempt takes a slot, and the tokens of each
answer's `usage` are recorded), and the retry policy of `selfreward.llm.retry` (connection
errors, timeouts, 429 and 5xx, honouring Retry-After). Client errors (4xx other than 408/429)
are not retried: they name the request's model and the server's message.

`view(...)` is the same client (connection pool, model list) with its own limits and retry
policy: a judge on the policy service uses a view of the stage's client, so a stage talks to the
policy through one connection pool and asks for the model list once (it is cached for
`MODELS_TTL_S` seconds and dropped when this client loads or unloads an adapter).

vLLM specifics used here: `structured_outputs` (e.g. {"regex": ...}) for constrained
decoding (the old `guided_regex` field is silently ignored by vLLM >= 0.11), token-id prompts,
`prompt_logprobs` and `return_tokens_as_token_ids` (model fingerprints), runtime LoRA
management under /v1/load_lora_adapter and /v1/unload_lora_adapter (a failed load answers
500 and is not retried: it fails the same way again), `/tokenize` and `/health`, and sleep mode
(`/sleep?level=1`, `/wake_up`, `/is_sleeping`: a server started with `--enable-sleep-mode` and
VLLM_SERVER_DEV_MODE=1; a 404 there raises `SleepModeUnavailable` naming the server).

The connection pool belongs to the event loop that first uses it: create the client in (or
for) one event loop, e.g. `async with OpenAICompatClient(url) as client:` inside the coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from selfreward.errors import ServiceError
from selfreward.llm.http import bearer, build_http_client
from selfreward.llm.limits import AnyLimits, Limits
from selfreward.llm.retry import ADMIN_RETRY_STATUS, RETRY_STATUS, HTTPStatusError, is_transient, with_retries

MODELS_TTL_S = 5.0


class SleepModeUnavailable(ServiceError):
    """A vLLM server without sleep mode was asked to sleep or wake (404 on /sleep)."""


@dataclass
class _Shared:
    """What a client and its views share: the connection pool and the cached model list."""

    http: httpx.AsyncClient
    models: list[dict[str, Any]] | None = None
    models_at: float = 0.0


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


def usage_tokens(usage: Any) -> int:
    """The tokens an answer's `usage` reports (total, else prompt + completion; 0 without)."""
    if not isinstance(usage, dict):
        return 0

    def count(key: str) -> int:
        value = usage.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    return count("total_tokens") or count("prompt_tokens") + count("completion_tokens")


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
        limits: AnyLimits | None = None,
        pool_size: int | None = None,
    ) -> None:
        """`pool_size`: requests the connection pool serves at once for this client and its
        views (default `concurrency`): a view with more in flight waits for connections."""
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.initial_backoff_s = initial_backoff_s
        self.on_retry = on_retry
        self.limits: AnyLimits = limits if limits is not None else Limits(concurrency, requests_per_minute)
        self._shared = _Shared(
            build_http_client(
                base_url=self.base_url,
                timeout_s=timeout_s,
                concurrency=max(concurrency, pool_size or 0),
                headers=bearer(api_key),
            )
        )
        self._owner = True

    def view(
        self,
        *,
        concurrency: int,
        requests_per_minute: int | None = None,
        timeout_s: float | None = None,
        max_retries: int | None = None,
        initial_backoff_s: float | None = None,
        on_retry: Callable[[BaseException], None] | None = None,
        limits: AnyLimits | None = None,
    ) -> OpenAICompatClient:
        """This client with its own limits (`limits`, else in-process ones of `concurrency` and
        `requests_per_minute`) and retry policy (same connection pool and model list); closing
        the view leaves this client open (and closes the view's limits)."""
        other = copy.copy(self)
        other.limits = limits if limits is not None else Limits(concurrency, requests_per_minute)
        other.timeout_s = self.timeout_s if timeout_s is None else timeout_s
        other.max_retries = self.max_retries if max_retries is None else max_retries
        other.initial_backoff_s = self.initial_backoff_s if initial_backoff_s is None else initial_backoff_s
        other.on_retry = on_retry
        other._owner = False
        return other

    def shares_pool_with(self, other: OpenAICompatClient) -> bool:
        return self._shared is other._shared

    async def aclose(self) -> None:
        await self.limits.aclose()
        if self._owner:
            await self._shared.http.aclose()

    @property
    def closed(self) -> bool:
        return self._shared.http.is_closed

    async def __aenter__(self) -> OpenAICompatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -------------------------------------------------------------- transport

    async def _request(
        self,
        method: str,
        path: str,
        json: Any = None,
        retry: bool = True,
        retry_statuses: frozenset[int] = RETRY_STATUS,
    ) -> Any:
        http = self._shared.http
        timeout = httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0))

        async def once() -> Any:
            async with self.limits.slot():
                try:
                    resp = await http.request(method, path, json=json, timeout=timeout)
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
        await self.limits.record_tokens(usage_tokens(data.get("usage")))
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
        await self.limits.record_tokens(usage_tokens(data.get("usage")))
        choices = []
        for c in sorted(data.get("choices", []), key=lambda c: c.get("index", 0)):
            tops, tokens = _completion_logprobs(c)
            choices.append(
                Choice(c.get("text") or "", c.get("finish_reason"), tops, tokens, _prompt_logprobs(c))
            )
        return Generation(data.get("model", model), choices, data.get("usage") or {}, data)

    # -------------------------------------------------------------- models and adapters

    async def models(self, fresh: bool = False) -> list[dict[str, Any]]:
        """The served models (GET /v1/models), cached for MODELS_TTL_S unless `fresh`."""
        shared = self._shared
        if fresh or shared.models is None or time.monotonic() - shared.models_at > MODELS_TTL_S:
            data = await self._request("GET", "/v1/models")
            shared.models = list(data.get("data", []))
            shared.models_at = time.monotonic()
        return [dict(m) for m in shared.models]

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
        self._shared.models = None
        try:
            await self._request("POST", "/v1/load_lora_adapter", body, retry_statuses=ADMIN_RETRY_STATUS)
        finally:
            self._shared.models = None

    async def unload_adapter(self, name: str) -> None:
        self._shared.models = None
        try:
            await self._request(
                "POST", "/v1/unload_lora_adapter", {"lora_name": name}, retry_statuses=ADMIN_RETRY_STATUS
            )
        finally:
            self._shared.models = None

    # -------------------------------------------------------------- sleep mode (vLLM)

    async def _sleep_endpoint(self, method: str, path: str) -> dict[str, Any]:
        try:
            data = await self._request(method, path, retry_statuses=ADMIN_RETRY_STATUS)
        except HTTPStatusError as exc:
            if exc.status == 404:
                raise SleepModeUnavailable(
                    f"policy replica {self.base_url}: {path.partition('?')[0]} answered 404: the server was not "
                    "started with sleep mode (vLLM's --enable-sleep-mode, with VLLM_SERVER_DEV_MODE=1 "
                    "for the endpoints); start it so (selfreward's launcher does when "
                    "policy.sleep_during_training resolves on; docker-compose.yml: POLICY_SLEEP_DURING_TRAINING, "
                    "TRAINER_SHARES_POLICY_GPU), or set policy.sleep_during_training: off"
                ) from exc
            raise
        return dict(data) if isinstance(data, dict) else {}

    async def sleep(self, level: int = 1) -> dict[str, Any]:
        """vLLM's POST /sleep?level=N (level 1: weights offloaded to CPU memory, KV cache
        discarded; requests in flight are aborted, new ones wait until /wake_up). Answers
        {"status": "sleeping", "level": N}; SleepModeUnavailable (404) without sleep mode."""
        return await self._sleep_endpoint("POST", f"/sleep?level={int(level)}")

    async def wake_up(self) -> dict[str, Any]:
        """vLLM's POST /wake_up (every tag): {"status": "awake", "tags": null}."""
        return await self._sleep_endpoint("POST", "/wake_up")

    async def is_sleeping(self) -> bool:
        """vLLM's GET /is_sleeping: {"is_sleeping": bool}."""
        return bool((await self._sleep_endpoint("GET", "/is_sleeping")).get("is_sleeping"))

    async def health(self, timeout_s: float = 5.0) -> bool:
        with contextlib.suppress(httpx.HTTPError, OSError):
            resp = await self._shared.http.get("/health", timeout=timeout_s)
            return resp.status_code == 200
        return False

    async def wait_healthy(self, timeout_s: float, interval_s: float = 1.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self.health():
                return
            await asyncio.sleep(interval_s)
        raise ServiceError(f"{self.base_url}: not healthy after {timeout_s:.0f} s")
