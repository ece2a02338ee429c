"""LLM backends: the policy service or any OpenAI-compatible server (here), and Gemini
(`selfreward.llm.gemini`); `make_backend` builds the one a spec names. Judges and the teacher
talk to models only through these.

Every backend bounds its requests in flight (`concurrency`), limits its request rate
(`requests_per_minute`) and, where the backend reports tokens, its token rate
(`tokens_per_minute`), and retries connection errors, timeouts, 429 and 5xx with
exponential backoff and full jitter, honouring the server's Retry-After (for Gemini also the
RetryInfo `retryDelay` of a 429 body): the policy of `selfreward.llm.retry`, shared by every
client of the project. The settings come from a config section with those fields
(`BackendSettings`: the run's `judge` section for judges and the teacher).

The limits live in this process (`selfreward.llm.limits.Limits`, the embedded mode), or, when
`make_backend` is given a `redis_url`, in Redis (`SharedLimits`): one budget per backend
(`limits_identity`: its spec, endpoint and model) shared by every judge replica and stage worker
on that Redis. The policy service (`policy:` specs, our own vLLM) keeps in-process limits.

Capabilities differ, and the judge asks before using one:
- vLLM (detected by `owned_by: vllm` in /v1/models): prefilled assistant turns
  (`continue_final_message`), constrained decoding (`structured_outputs`), exact logprobs
  of chosen tokens (`logprob_token_ids`), and the context check (/tokenize);
- another OpenAI-compatible server: chat with top logprobs;
- Gemini: generateContent with `responseLogprobs`/`logprobs` (model dependent).

A backend opens its HTTP client on first use (in the event loop that uses it) and closes it
in `aclose()`; it opens a new one if used again after that. A backend of the policy service
built with the stage's client (`client=`) uses a view of it: one connection pool per stage.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from selfreward.config import TeacherConfig
from selfreward.errors import ConfigError
from selfreward.llm.limits import AnyLimits, Limits, SharedLimits
from selfreward.llm.openai import OpenAICompatClient
from selfreward.llm.retry import HTTPStatusError
from selfreward.llm.specs import BackendSpec, parse_spec, resolve_api_key

# status codes that make every later request fail too: stop at once instead of per verdict
FATAL_STATUS = {401, 403, 404}


class BackendSettings(Protocol):
    """Limits and retries of a backend (the fields of the run config's `judge` section)."""

    concurrency: int
    requests_per_minute: int | None
    tokens_per_minute: int | None
    timeout_s: float
    max_retries: int
    initial_backoff_s: float


def limits_identity(spec: BackendSpec, teacher: TeacherConfig | None = None) -> str:
    """What names a backend's shared budget: the spec (an `openai:` spec holds its endpoint and
    model), and for Gemini the endpoint when it is not Google's (a proxy, a local fake)."""
    if spec.kind == "gemini" and teacher is not None and teacher.gemini_base_url:
        return f"{spec.name}@{teacher.gemini_base_url.rstrip('/')}"
    return spec.name


def backend_limits(settings: BackendSettings, identity: str, redis_url: str | None = None) -> AnyLimits:
    """The limits of one backend: shared through Redis when `redis_url` is given, else in-process."""
    if redis_url:
        return SharedLimits(
            redis_url,
            identity,
            settings.concurrency,
            settings.requests_per_minute,
            settings.tokens_per_minute,
        )
    return Limits(
        settings.concurrency, settings.requests_per_minute, tokens_per_minute=settings.tokens_per_minute
    )


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
    spec: BackendSpec
    events: BackendEvents
    context_len: int | None = None  # the model's context, once a count reported it
    _usage: Counter[str] | None = None

    @property
    def usage(self) -> Counter[str]:
        """Tokens the backend reported so far (`prompt_tokens`, `completion_tokens`); empty when it
        reports none (the judge benchmark's cost)."""
        if self._usage is None:
            self._usage = Counter()
        return self._usage

    def count_usage(self, prompt_tokens: Any, completion_tokens: Any) -> None:
        for key, value in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens)):
            if isinstance(value, int) and not isinstance(value, bool):
                self.usage[key] += value

    async def capabilities(self) -> Capabilities:
        raise NotImplementedError

    def start(self) -> None:
        """Build the client (imports, connection pool, limits) ahead of the first request; sends
        nothing. A long-lived service calls it at start so its first request does not pay for it
        (the judge service: google-genai's import and client, about 0.5 s on 2 cores)."""
        return None

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
        self,
        spec: BackendSpec,
        settings: BackendSettings,
        api_key: str | None,
        events: BackendEvents | None = None,
        client: OpenAICompatClient | None = None,
        redis_url: str | None = None,
    ) -> None:
        assert spec.base_url is not None
        self.spec = spec
        self.settings = settings
        self.redis_url = redis_url
        self._api_key = api_key
        self.events = events or BackendEvents()
        self._shared = client  # the stage's client of the same server, used through a view
        self._http: OpenAICompatClient | None = None
        self._caps: Capabilities | None = None
        self._label_ids: dict[tuple[str, ...], list[int] | None] = {}
        self._lock: asyncio.Lock | None = None

    def _setup_lock(self) -> asyncio.Lock:
        """Serialises the one-time probes (capabilities, label token ids)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _client(self) -> OpenAICompatClient:
        if self._http is None or self._http.closed:
            s = self.settings
            options: dict[str, Any] = dict(
                concurrency=s.concurrency,
                requests_per_minute=s.requests_per_minute,
                timeout_s=s.timeout_s,
                max_retries=s.max_retries,
                initial_backoff_s=s.initial_backoff_s,
                on_retry=lambda exc: self.events.on_retry(self.spec.name, exc),
                limits=backend_limits(s, limits_identity(self.spec), self.redis_url),
            )
            if self._shared is not None and not self._shared.closed:
                self._http = self._shared.view(**options)
            else:
                self._http = OpenAICompatClient(str(self.spec.base_url), api_key=self._api_key, **options)
        return self._http

    def start(self) -> None:
        self._client()

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
        self.count_usage(gen.usage.get("prompt_tokens"), gen.usage.get("completion_tokens"))
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
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        self._lock = None


def make_backend(
    spec: str | BackendSpec,
    settings: BackendSettings,
    *,
    teacher: TeacherConfig | None = None,
    policy_url: str | None = None,
    self_model: str | None = None,
    events: BackendEvents | None = None,
    client: OpenAICompatClient | None = None,
    redis_url: str | None = None,
) -> Backend:
    """The backend a spec names (see selfreward.llm.specs), with the API key of the key rule.

    `client`: an open client of the policy service; a backend of that same server shares its
    connection pool and model list (a view with the backend's own limits and retries).

    `redis_url`: the backend's limits are kept there, shared with every process using the same
    backend and Redis (`SharedLimits`), except for the policy service's own models (`policy:`);
    without it they are this process' (`Limits`).
    """
    from selfreward.llm.gemini import GeminiBackend

    teacher = teacher or TeacherConfig()
    resolved = (
        spec
        if isinstance(spec, BackendSpec)
        else parse_spec(spec, self_model=self_model, policy_url=policy_url)
    )
    if resolved.kind == "gemini":
        key = resolve_api_key(resolved, teacher)
        assert key is not None
        return GeminiBackend(resolved, settings, teacher, key, events, redis_url=redis_url)
    shared = (
        client
        if client is not None and client.base_url == str(resolved.base_url).removesuffix("/v1")
        else None
    )
    return OpenAICompatBackend(
        resolved,
        settings,
        resolve_api_key(resolved, teacher),
        events,
        client=shared,
        redis_url=redis_url if resolved.kind != "policy" else None,
    )
