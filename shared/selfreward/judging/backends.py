"""Judge backends: the policy service or any OpenAI-compatible server, and Gemini.

Every backend bounds its requests in flight (`judge.concurrency`), limits its request rate
(`judge.requests_per_minute`), and retries connection errors, timeouts, 429 and 5xx with
exponential backoff and full jitter, honouring the server's Retry-After (for Gemini also the
RetryInfo `retryDelay` of a 429 body). The retry policy is the one of
`selfreward.clients.openai_compat` (`with_retries`), shared by every client of the project.

Capabilities differ, and the judge asks before using one:
- vLLM (detected by `owned_by: vllm` in /v1/models): prefilled assistant turns
  (`continue_final_message`), constrained decoding (`structured_outputs`), exact logprobs
  of chosen tokens (`logprob_token_ids`), and the context check (/tokenize);
- another OpenAI-compatible server: chat with top logprobs;
- Gemini: generateContent with `responseLogprobs`/`logprobs` (model dependent).

A backend binds its HTTP clients to the event loop that first uses them and makes new ones
when called from another loop, so a judge can serve several `asyncio.run` calls.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from selfreward.clients.openai_compat import (
    HTTPStatusError,
    OpenAICompatClient,
    RateLimiter,
    parse_retry_after,
    with_retries,
)
from selfreward.config import JudgeConfig, TeacherConfig
from selfreward.errors import ConfigError, ServiceError
from selfreward.judging.specs import JudgeSpec

# status codes that make every later request fail too: stop at once instead of per verdict
FATAL_STATUS = {401, 403, 404}


@dataclass(frozen=True)
class Constraint:
    """Constrained decoding request (honoured where `Capabilities.structured`)."""

    regex: str | None = None
    choice: tuple[str, ...] | None = None

    def as_vllm(self) -> dict[str, Any]:
        if self.regex is not None:
            return {"regex": self.regex}
        return {"choice": list(self.choice or ())}


@dataclass
class Output:
    text: str
    finish_reason: str | None = None
    # per generated position: {token: logprob} (None when logprobs were not asked or returned)
    top_logprobs: list[dict[str, float]] | None = None
    tokens: list[str] | None = None
    blocked: str | None = None  # the provider refused to answer (e.g. Gemini's SAFETY)


@dataclass(frozen=True)
class Capabilities:
    prefill: bool = False
    structured: bool = False
    logprobs: bool = True
    label_logprobs: bool = False
    context: bool = False
    server: str = "openai-compatible"


@dataclass
class BackendEvents:
    """Hooks for metrics: called on each model call and each retry."""

    on_call: Callable[[str, float, bool], None] = field(default=lambda backend, seconds, ok: None)
    on_retry: Callable[[str, BaseException], None] = field(default=lambda backend, exc: None)


class Backend:
    spec: JudgeSpec
    events: BackendEvents
    context_len: int | None = None  # the model's context, once a count reported it

    async def capabilities(self) -> Capabilities:
        raise NotImplementedError

    async def generate(
        self,
        prompt: str,
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        constraint: Constraint | None = None,
        prefill: str | None = None,
        top_logprobs: int | None = None,
        label_tokens: tuple[str, ...] | None = None,
    ) -> list[Output]:
        raise NotImplementedError

    async def count_tokens(self, prompt: str, prefill: str | None = None) -> tuple[int, int] | None:
        """(prompt tokens, context length) where the backend reports them, else None."""
        return None

    async def aclose(self) -> None:
        return None


# ---------------------------------------------------------------- OpenAI-compatible


class OpenAICompatBackend(Backend):
    """policy:<name> (the policy service) and openai:<url>#<model> (any OpenAI-compatible server)."""

    def __init__(
        self, spec: JudgeSpec, config: JudgeConfig, api_key: str | None, events: BackendEvents | None = None
    ) -> None:
        assert spec.base_url is not None
        self.spec = spec
        self.config = config
        self._api_key = api_key
        self.events = events or BackendEvents()
        self._clients: dict[int, tuple[asyncio.AbstractEventLoop, OpenAICompatClient]] = {}
        self._caps: Capabilities | None = None
        self._label_ids: dict[tuple[str, ...], list[int] | None] = {}
        self._locks: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Lock]] = {}

    def _setup_lock(self) -> asyncio.Lock:
        """Serialises the one-time probes (capabilities, label token ids) within an event loop."""
        loop = asyncio.get_running_loop()
        entry = self._locks.get(id(loop))
        if entry is None or entry[0] is not loop:
            entry = (loop, asyncio.Lock())
            self._locks = {k: v for k, v in self._locks.items() if not v[0].is_closed()}
            self._locks[id(loop)] = entry
        return entry[1]

    def _client(self) -> OpenAICompatClient:
        loop = asyncio.get_running_loop()
        entry = self._clients.get(id(loop))
        if entry is None or entry[0] is not loop:
            cfg = self.config
            client = OpenAICompatClient(
                str(self.spec.base_url),
                api_key=self._api_key,
                concurrency=cfg.concurrency,
                requests_per_minute=cfg.requests_per_minute,
                timeout_s=cfg.timeout_s,
                max_retries=cfg.max_retries,
                initial_backoff_s=cfg.initial_backoff_s,
                on_retry=lambda exc: self.events.on_retry(self.spec.name, exc),
            )
            self._clients = {k: v for k, v in self._clients.items() if not v[0].is_closed()}
            self._clients[id(loop)] = (loop, client)
            return client
        return entry[1]

    async def capabilities(self) -> Capabilities:
        if self._caps is not None:
            return self._caps
        async with self._setup_lock():
            if self._caps is None:
                self._caps = await self._probe()
        return self._caps

    async def _probe(self) -> Capabilities:
        try:
            models = await self._client().models()
        except HTTPStatusError as exc:
            if exc.status in (404, 405):  # a server without /v1/models: plain chat only
                return Capabilities()
            raise
        names = [str(m.get("id")) for m in models]
        if self.spec.kind == "policy" and self.spec.model not in names:
            raise ConfigError(
                [f"judge {self.spec.name}: the policy service at {self.spec.base_url} serves {names}"],
                "judge",
            )
        ours = next((m for m in models if m.get("id") == self.spec.model), models[0] if models else {})
        if str(ours.get("owned_by", "")).lower() == "vllm":
            return Capabilities(
                prefill=True, structured=True, label_logprobs=True, context=True, server="vllm"
            )
        return Capabilities()

    async def _label_token_ids(self, labels: tuple[str, ...]) -> list[int] | None:
        """Token ids of each label ("3" and " 3" forms) when each is a single token, else None."""
        if labels in self._label_ids:
            return self._label_ids[labels]
        async with self._setup_lock():
            if labels not in self._label_ids:
                self._label_ids[labels] = await self._tokenize_labels(labels)
        return self._label_ids[labels]

    async def _tokenize_labels(self, labels: tuple[str, ...]) -> list[int] | None:
        ids: list[int] = []
        for label in labels:
            forms = []
            for form in (label, " " + label):
                data = await self._client().tokenize(self.spec.model, prompt=form, add_special_tokens=False)
                if len(data.get("tokens", [])) == 1:
                    forms.append(int(data["tokens"][0]))
            if not forms:
                return None
            ids.extend(forms)
        return sorted(set(ids))

    async def generate(
        self,
        prompt: str,
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        constraint: Constraint | None = None,
        prefill: str | None = None,
        top_logprobs: int | None = None,
        label_tokens: tuple[str, ...] | None = None,
    ) -> list[Output]:
        caps = await self.capabilities()
        messages = [{"role": "user", "content": prompt}]
        extra: dict[str, Any] = {}
        if prefill is not None:
            if not caps.prefill:
                raise ConfigError(
                    [f"judge {self.spec.name}: this server cannot continue a prefilled answer"], "judge"
                )
            messages.append({"role": "assistant", "content": prefill})
            extra.update(continue_final_message=True, add_generation_prompt=False)
        if top_logprobs is not None and label_tokens and caps.label_logprobs:
            ids = await self._label_token_ids(label_tokens)
            if ids:
                extra["logprob_token_ids"] = ids
        structured = constraint.as_vllm() if constraint is not None and caps.structured else None
        started = time.monotonic()
        ok = False
        try:
            gen = await self._client().chat(
                self.spec.model,
                messages,
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens,
                top_logprobs=top_logprobs,
                structured=structured,
                extra=extra or None,
            )
            ok = True
        finally:
            self.events.on_call(self.spec.name, time.monotonic() - started, ok)
        return [Output(c.text, c.finish_reason, c.top_logprobs, c.tokens) for c in gen.choices]

    async def count_tokens(self, prompt: str, prefill: str | None = None) -> tuple[int, int] | None:
        caps = await self.capabilities()
        if not caps.context:
            return None
        messages = [{"role": "user", "content": prompt}]
        if prefill is not None:
            messages.append({"role": "assistant", "content": prefill})
        data = await self._client().tokenize(
            self.spec.model,
            messages=messages,
            add_generation_prompt=prefill is None,
            continue_final_message=prefill is not None,
        )
        self.context_len = int(data["max_model_len"])
        return int(data["count"]), self.context_len

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        for key, (owner, client) in list(self._clients.items()):
            if owner is loop:
                await client.aclose()
            del self._clients[key]


# ---------------------------------------------------------------- Gemini

_RETRY_DELAY = re.compile(r"^\s*([0-9.]+)s\s*$")


def _gemini_retry_after(exc: Any) -> float | None:
    """Retry-After header, else google.rpc.RetryInfo's retryDelay ("12s") in the error body."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is not None:
        value = parse_retry_after(headers.get("retry-after"))
        if value is not None:
            return value
    details = getattr(exc, "details", None)
    error = details.get("error", details) if isinstance(details, dict) else {}
    for item in error.get("details", []) if isinstance(error, dict) else []:
        if isinstance(item, dict) and str(item.get("@type", "")).endswith("google.rpc.RetryInfo"):
            m = _RETRY_DELAY.match(str(item.get("retryDelay", "")))
            if m:
                return float(m.group(1))
    return None


class GeminiBackend(Backend):
    """gemini:<model> through google-genai's async client (`client.aio.models.generate_content`).

    The SDK's own retries are switched off (one retry policy for the project); its HTTP
    transport is an httpx.AsyncClient of ours, so timeouts and connection errors surface as
    httpx errors that `with_retries` knows.
    """

    def __init__(
        self,
        spec: JudgeSpec,
        config: JudgeConfig,
        teacher: TeacherConfig,
        api_key: str,
        events: BackendEvents | None = None,
    ) -> None:
        self.spec = spec
        self.config = config
        self.teacher = teacher
        self._api_key = api_key
        self.events = events or BackendEvents()
        self._state: dict[int, tuple[asyncio.AbstractEventLoop, Any, httpx.AsyncClient]] = {}
        self._semaphores: dict[int, asyncio.Semaphore] = {}
        self._limiters: dict[int, RateLimiter] = {}

    def _url(self) -> str:
        base = self.teacher.gemini_base_url or "https://generativelanguage.googleapis.com"
        return (
            f"{base.rstrip('/')}/{self.teacher.gemini_api_version}/models/{self.spec.model}:generateContent"
        )

    def _client(self) -> tuple[Any, asyncio.Semaphore, RateLimiter]:
        from google import genai
        from google.genai import types

        loop = asyncio.get_running_loop()
        key = id(loop)
        entry = self._state.get(key)
        if entry is None or entry[0] is not loop:
            cfg = self.config
            http = httpx.AsyncClient(
                timeout=httpx.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 10.0)),
                limits=httpx.Limits(
                    max_connections=cfg.concurrency * 2, max_keepalive_connections=cfg.concurrency
                ),
            )
            options = types.HttpOptions(
                api_version=self.teacher.gemini_api_version,
                timeout=int(cfg.timeout_s * 1000),
                retry_options=types.HttpRetryOptions(attempts=1),
                httpx_async_client=http,
            )
            if self.teacher.gemini_base_url:
                options.base_url = self.teacher.gemini_base_url
            client = genai.Client(api_key=self._api_key, http_options=options)
            self._state = {k: v for k, v in self._state.items() if not v[0].is_closed()}
            self._state[key] = (loop, client, http)
            self._semaphores[key] = asyncio.Semaphore(cfg.concurrency)
            self._limiters[key] = RateLimiter(cfg.requests_per_minute)
        return self._state[key][1], self._semaphores[key], self._limiters[key]

    async def capabilities(self) -> Capabilities:
        return Capabilities(prefill=False, structured=False, logprobs=True, server="gemini")

    def _gen_config(self, temperature: float, top_p: float, max_tokens: int, top_logprobs: int | None) -> Any:
        from google.genai import types

        kwargs: dict[str, Any] = dict(
            temperature=temperature, top_p=top_p, max_output_tokens=max_tokens, candidate_count=1
        )
        if top_logprobs is not None:
            kwargs.update(response_logprobs=True, logprobs=min(top_logprobs, 20))
        if self.teacher.gemini_thinking_budget is not None:
            kwargs["thinking_config"] = types.ThinkingConfig(
                thinking_budget=self.teacher.gemini_thinking_budget
            )
        return types.GenerateContentConfig(**kwargs)

    async def _one(self, prompt: str, gen_config: Any) -> Output:
        from google.genai import errors as genai_errors

        client, semaphore, limiter = self._client()
        url = self._url()

        async def once() -> Any:
            await limiter.acquire()
            async with semaphore:
                started = time.monotonic()
                ok = False
                try:
                    response = await client.aio.models.generate_content(
                        model=self.spec.model, contents=prompt, config=gen_config
                    )
                    ok = True
                    return response
                except genai_errors.APIError as exc:
                    if exc.code == 400 and "API_KEY_INVALID" in json.dumps(exc.details, default=str):
                        raise ConfigError(
                            [f"judge {self.spec.name}: the API key was rejected (API_KEY_INVALID)"], "teacher"
                        ) from None
                    raise HTTPStatusError(
                        url,
                        int(exc.code or 500),
                        str(exc.message or exc.status or ""),
                        _gemini_retry_after(exc),
                    ) from None
                except (json.JSONDecodeError, ValueError, TypeError, KeyError) as exc:
                    # a 200 whose body is not a GenerateContentResponse: treat as a bad gateway
                    raise HTTPStatusError(
                        url, 502, f"malformed response body ({type(exc).__name__})"
                    ) from None
                finally:
                    self.events.on_call(self.spec.name, time.monotonic() - started, ok)

        try:
            response = await with_retries(
                once,
                self.config.max_retries,
                lambda exc: self.events.on_retry(self.spec.name, exc),
                self.config.initial_backoff_s,
            )
        except httpx.TransportError as exc:
            raise ServiceError(
                f"{self.spec.name}: unreachable after {self.config.max_retries + 1} attempts "
                f"({type(exc).__name__})"
            ) from exc
        return _gemini_output(response)

    async def generate(
        self,
        prompt: str,
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        constraint: Constraint | None = None,
        prefill: str | None = None,
        top_logprobs: int | None = None,
        label_tokens: tuple[str, ...] | None = None,
    ) -> list[Output]:
        if prefill is not None:
            raise ConfigError([f"judge {self.spec.name}: Gemini cannot continue a prefilled answer"], "judge")
        gen_config = self._gen_config(temperature, top_p, max_tokens, top_logprobs)
        return list(await asyncio.gather(*(self._one(prompt, gen_config) for _ in range(n))))

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        for key, (owner, _client, http) in list(self._state.items()):
            if owner is loop:
                await http.aclose()
            del self._state[key]
            self._semaphores.pop(key, None)
            self._limiters.pop(key, None)


def _gemini_output(response: Any) -> Output:
    feedback = getattr(response, "prompt_feedback", None)
    candidates = getattr(response, "candidates", None) or []
    if not candidates:
        reason = getattr(feedback, "block_reason", None) if feedback is not None else None
        return Output("", "blocked", blocked=str(getattr(reason, "value", reason) or "no candidates"))
    cand = candidates[0]
    parts = (cand.content.parts if cand.content is not None else None) or []
    text = "".join(p.text for p in parts if p.text and not p.thought)
    finish = cand.finish_reason
    finish_s = str(getattr(finish, "value", finish)) if finish is not None else None
    blocked = (
        finish_s if finish_s in {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII"} else None
    )
    tops: list[dict[str, float]] | None = None
    tokens: list[str] | None = None
    lp = cand.logprobs_result
    if lp is not None and lp.top_candidates:
        tops = [
            {
                c.token or "": float(c.log_probability)
                for c in (pos.candidates or [])
                if c.log_probability is not None
            }
            for pos in lp.top_candidates
        ]
        tokens = [c.token or "" for c in (lp.chosen_candidates or [])]
    return Output(text, finish_s, tops, tokens, blocked)
