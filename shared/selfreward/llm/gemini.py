"""Gemini through google-genai's async client (`client.aio.models.generate_content`).

The SDK's own retries are switched off (one retry policy for the project, selfreward.llm.retry);
its HTTP transport is an httpx.AsyncClient built by selfreward.llm.http, so timeouts and
connection errors surface as httpx errors that `with_retries` knows. A 429's RetryInfo
`retryDelay` counts as its Retry-After. Limits as every backend's (selfreward.llm.backend: in
this process, or shared through Redis); `usageMetadata.totalTokenCount` counts against
`tokens_per_minute`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import httpx

from selfreward.config import TeacherConfig
from selfreward.errors import ConfigError, ServiceError
from selfreward.llm.backend import (
    Backend,
    BackendEvents,
    BackendSettings,
    Capabilities,
    Constraint,
    Output,
    backend_limits,
    limits_identity,
)
from selfreward.llm.http import build_http_client
from selfreward.llm.limits import AnyLimits
from selfreward.llm.retry import HTTPStatusError, parse_retry_after, with_retries
from selfreward.llm.specs import BackendSpec

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
    """gemini:<model> (see the module docstring)."""

    def __init__(
        self,
        spec: BackendSpec,
        settings: BackendSettings,
        teacher: TeacherConfig,
        api_key: str,
        events: BackendEvents | None = None,
        redis_url: str | None = None,
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.redis_url = redis_url
        self.teacher = teacher
        self._api_key = api_key
        self.events = events or BackendEvents()
        self._state: tuple[Any, httpx.AsyncClient, AnyLimits] | None = None

    def _url(self) -> str:
        base = self.teacher.gemini_base_url or "https://generativelanguage.googleapis.com"
        return (
            f"{base.rstrip('/')}/{self.teacher.gemini_api_version}/models/{self.spec.model}:generateContent"
        )

    def _client(self) -> tuple[Any, AnyLimits]:
        from google import genai
        from google.genai import types

        if self._state is None or self._state[1].is_closed:
            s = self.settings
            http = build_http_client(timeout_s=s.timeout_s, concurrency=s.concurrency)
            options = types.HttpOptions(
                api_version=self.teacher.gemini_api_version,
                timeout=int(s.timeout_s * 1000),
                retry_options=types.HttpRetryOptions(attempts=1),
                httpx_async_client=http,
            )
            if self.teacher.gemini_base_url:
                options.base_url = self.teacher.gemini_base_url
            client = genai.Client(api_key=self._api_key, http_options=options)
            limits = backend_limits(s, limits_identity(self.spec, self.teacher), self.redis_url)
            self._state = (client, http, limits)
        return self._state[0], self._state[2]

    def start(self) -> None:
        self._client()

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

        client, limits = self._client()
        url = self._url()

        async def once() -> Any:
            async with limits.slot():
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
                self.settings.max_retries,
                lambda exc: self.events.on_retry(self.spec.name, exc),
                self.settings.initial_backoff_s,
            )
        except httpx.TransportError as exc:
            raise ServiceError(
                f"{self.spec.name}: unreachable after {self.settings.max_retries + 1} attempts "
                f"({type(exc).__name__})"
            ) from exc
        meta = getattr(response, "usage_metadata", None)
        if meta is not None:
            self.count_usage(
                getattr(meta, "prompt_token_count", None), getattr(meta, "candidates_token_count", None)
            )
            await limits.record_tokens(_total_tokens(meta))
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
        if self._state is not None:
            _, http, limits = self._state
            self._state = None
            await http.aclose()
            await limits.aclose()


def _total_tokens(meta: Any) -> int:
    """The tokens a response's usage_metadata reports (total, else prompt + candidates + thoughts)."""

    def count(name: str) -> int:
        value = getattr(meta, name, None)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    return count("total_token_count") or (
        count("prompt_token_count") + count("candidates_token_count") + count("thoughts_token_count")
    )


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
