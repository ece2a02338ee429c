"""LLM-as-a-Judge: pointwise scores (Yuan et al. 2024's additive 5-point prompt) and pairwise
preferences (AlpacaEval-style prompt, both orders), over any backend.

Scoring modes (`judge.mode`):
- `sample`: K verdicts at the judge temperature; score = mean of the parsed scores
  (`parse_score`: the last "Score: N", an integer 0..5); unparseable verdicts are failures
  with their text, never a score. Where the backend supports constrained decoding (vLLM),
  a verdict is constrained to end with a line "Score: [0-5]" after at most 3 x max_tokens chars.
- `logprob`: one verdict whose score is the expectation of 0..5 under the next-token
  distribution of the score digit, renormalised over the digits. Read after a prefilled
  "Score: " (vLLM: `continue_final_message`, one generated token) or at the score position of
  a greedy verdict (any backend that returns logprobs), per `judge.logprob_source`.

Pairwise (`compare`): the prompt is asked in both orders (A as output_1, then as output_2).
Sample mode reads one greedy identifier per order; logprob mode the probability mass of
the identifiers. preference = 1.0 when both orders prefer A, 0.0 when both prefer B, 0.5
when they disagree (a tie, as in Yuan et al.) or when an order failed (then `failure` says
why). In logprob mode the preference is the mean of P(A better) over the two orders when
both lean the same way, else 0.5.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from selfreward.config import JudgeConfig, RunConfig, TeacherConfig
from selfreward.errors import ConfigError, ServiceError
from selfreward.judging.cache import VerdictCache, cache_key
from selfreward.judging.parsing import (
    PAIR_IDS,
    SCORE_DIGITS,
    expected_score,
    label_distribution,
    parse_score,
    parse_winner,
    score_position,
)
from selfreward.judging.protocol import (
    CompareResult,
    ConfiguredJudge,
    JudgeObserver,
    Mode,
    PairVerdict,
    ScoreResult,
    ShownVerdict,
    failure_kind,
    is_cacheable,
)
from selfreward.judging.truncation import shrink_for_overflow, truncate_chars
from selfreward.llm.backend import (
    FATAL_STATUS,
    Backend,
    BackendEvents,
    Capabilities,
    Constraint,
    Output,
    make_backend,
)
from selfreward.llm.openai import OpenAICompatClient
from selfreward.llm.retry import HTTPStatusError
from selfreward.llm.specs import BackendSpec, parse_spec
from selfreward.prompts import Template
from selfreward.schemas import Verdict

SCORE_PREFILL = "Score: "
# tokens that stay free after the prompt: the verdict (sample) or a few tokens (logprob, pairwise)
SHORT_RESERVE = 8
CONTEXT_ROUNDS = 4
CHAT_MARGIN = 128  # tokens a chat template may add around the prompt
STRUCTURED_TAIL = 16  # tokens kept for "Score: N" and the end of a constrained verdict
CONTEXT_OVERFLOW = "context_overflow: the prompt template and instruction alone exceed the judge's context"


def structured_chars(max_tokens: int, room: int | None) -> int:
    """Length bound of a constrained justification: 3 x max_tokens characters, less where the
    context leaves fewer tokens (counting one token per character, plus the score's tokens)."""
    bound = 3 * max_tokens
    if room is not None:
        bound = min(bound, room - STRUCTURED_TAIL)
    return max(0, bound)


def score_regex(max_chars: int) -> str:
    """Constrained verdict: "Score: [0-5]" alone, or after a justification of at most `max_chars`
    characters ending in a newline (so the label stands on its own line, as the prompt asks)."""
    return r"(?:[\s\S]{0," + str(max_chars) + r"}\n)?Score: [0-5]"


@dataclass(frozen=True)
class Fitted:
    prompt: str | None  # None: cannot fit even with the responses cut to nothing
    cut: bool  # the token rule cut the response(s)
    room: int | None  # tokens left after the prompt (a lower bound), where the backend reports it


class LLMJudge(ConfiguredJudge):
    """A `Judge` (selfreward.judging.protocol) over one model backend; see the module docstring."""

    def __init__(
        self,
        spec: BackendSpec,
        config: JudgeConfig,
        backend: Backend,
        cache: VerdictCache | None,
        observer: JudgeObserver | None = None,
        owns_cache: bool = True,
    ) -> None:
        self.spec = spec
        self.config = config
        self.backend = backend
        self.cache = cache
        self.owns_cache = owns_cache  # False: a cache shared with other judges (the judge service's)
        self.observer = observer or JudgeObserver()
        self._load_templates()

    @property
    def name(self) -> str:
        return self.spec.name

    # ------------------------------------------------------------ helpers

    async def _caps(self) -> Capabilities:
        return await self.backend.capabilities()

    async def _logprob_source(self) -> Literal["prefill", "verdict"]:
        caps = await self._caps()
        source = self.config.logprob_source
        if source == "prefill" and not caps.prefill:
            raise ConfigError(
                [
                    f"judge.logprob_source=prefill: {self.name} ({caps.server}) cannot continue a prefilled "
                    "answer; use logprob_source: verdict (or auto)"
                ],
                "judge",
            )
        if source == "auto":
            return "prefill" if caps.prefill else "verdict"
        return source

    async def _fit(
        self,
        template: Template,
        instruction: str,
        texts: list[str],
        fields: tuple[str, ...],
        reserve: int,
        prefill: str | None,
    ) -> Fitted:
        """Render the prompt, cutting `texts` by the token rule where the backend reports its context."""
        cut = False
        for _ in range(CONTEXT_ROUNDS + 1):
            prompt = template.render(instruction=instruction, **dict(zip(fields, texts, strict=True)))
            counted = await self._count(prompt, prefill, reserve)
            if counted is None:
                return Fitted(prompt, cut, None)
            tokens, limit = counted
            budget = limit - reserve
            if tokens <= budget:
                return Fitted(prompt, cut, limit - tokens)
            if all(not t for t in texts):
                break
            shrunk = shrink_for_overflow(texts, len(prompt), tokens, budget)
            if shrunk == texts:
                break
            texts, cut = shrunk, True
        return Fitted(None, cut, None)

    async def _count(self, prompt: str, prefill: str | None, reserve: int) -> tuple[int, int] | None:
        """(tokens, context) of the prompt, or None when the backend does not report its context.

        A token covers at least one byte of text, so a prompt whose UTF-8 bytes plus the chat
        template's overhead (CHAT_MARGIN) and the reserve fit the known context is not sent to
        the tokenizer: its byte count (+ CHAT_MARGIN) stands in as an upper bound.
        """
        if not (await self._caps()).context:
            return None
        known = self.backend.context_len
        size = len(prompt.encode("utf-8")) + len((prefill or "").encode("utf-8")) + CHAT_MARGIN
        if known is not None and size + reserve <= known:
            return size, known
        return await self.backend.count_tokens(prompt, prefill)

    def _failed(self, failure: str) -> None:
        self.observer.failure(failure_kind(failure))

    async def _generate(self, prompt: str, **kwargs: Any) -> list[Output] | str:
        """Backend outputs, or a 'backend_error: ...' failure (fatal errors are raised)."""
        try:
            return await self.backend.generate(prompt, **kwargs)
        except HTTPStatusError as exc:
            if exc.status in FATAL_STATUS:
                raise
            return f"backend_error: HTTP {exc.status}: {exc.body[:300]}"
        except ServiceError as exc:
            return f"backend_error: {str(exc)[:300]}"

    # ------------------------------------------------------------ pointwise

    async def _score_params(self) -> dict[str, Any]:
        cfg = self.config
        caps = await self._caps()
        params: dict[str, Any] = {"mode": cfg.mode, "max_response_chars": cfg.max_response_chars}
        if cfg.mode == "sample":
            params.update(
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_tokens=cfg.max_tokens,
                structured=cfg.structured and caps.structured,
            )
        else:
            source = await self._logprob_source()
            params.update(source=source, top_logprobs=cfg.top_logprobs)
            if source == "verdict":
                params.update(max_tokens=cfg.max_tokens, structured=cfg.structured and caps.structured)
        return params

    async def score(
        self, instruction: str, responses: Sequence[str], samples: int | None = None
    ) -> list[ScoreResult]:
        """Score each response to `instruction`; K = `samples` or judge.samples (1 in logprob mode)."""
        k = 1 if self.mode == "logprob" else (samples or self.config.samples)
        if k < 1:
            raise ConfigError([f"samples must be >= 1 (got {k})"], "judge")
        params = await self._score_params()
        return list(await asyncio.gather(*(self._score_one(instruction, r, k, params) for r in responses)))

    async def _score_one(
        self, instruction: str, response: str, k: int, params: dict[str, Any]
    ) -> ScoreResult:
        keys = [
            cache_key(
                judge=self.name,
                template_sha256=self.template.sha256,
                task="score",
                params=params,
                sample=i,
                instruction=instruction,
                responses=[response],
            )
            for i in range(k)
        ]
        hits = await self.cache.get_many(keys) if self.cache is not None else [None] * k
        verdicts: list[Verdict | None] = [Verdict.model_validate(h) if h is not None else None for h in hits]
        n_cached = sum(v is not None for v in verdicts)
        missing = [i for i, v in enumerate(verdicts) if v is None]
        self.observer.cache(n_cached, len(missing))
        cut_response, truncated = truncate_chars(response, self.config.max_response_chars)
        if missing:
            new = await self._new_score_verdicts(instruction, cut_response, len(missing), params)
            truncated = truncated or any(v.model_extra and v.model_extra.get("context_cut") for v in new)
            to_cache = {}
            for i, v in zip(missing, new, strict=True):
                verdicts[i] = v
                if v.failure is not None:
                    self._failed(v.failure)
                if is_cacheable(v.failure):
                    to_cache[keys[i]] = v.model_dump(mode="json")
            if self.cache is not None:
                await self.cache.put_many(to_cache)
        else:
            truncated = truncated or any(
                v.model_extra and v.model_extra.get("context_cut") for v in verdicts if v
            )
        final = [v for v in verdicts if v is not None]
        scores = [v.score for v in final if v.score is not None]
        return ScoreResult(
            score=sum(scores) / len(scores) if scores else None,
            verdicts=final,
            failures=sum(1 for v in final if v.score is None),
            truncated=truncated,
            template_sha256=self.template.sha256,
            judge=self.name,
            mode=self.mode,
            cached=n_cached,
        )

    async def _new_score_verdicts(
        self, instruction: str, response: str, n: int, params: dict[str, Any]
    ) -> list[Verdict]:
        cfg = self.config
        source = params.get("source")
        prefill = SCORE_PREFILL if source == "prefill" else None
        reserve = cfg.max_tokens if (cfg.mode == "sample" or source == "verdict") else SHORT_RESERVE
        fitted = await self._fit(self.template, instruction, [response], ("response",), reserve, prefill)
        prompt = fitted.prompt
        if prompt is None:
            return [Verdict(text="", failure=CONTEXT_OVERFLOW) for _ in range(n)]
        extra = {"context_cut": True} if fitted.cut else {}
        structured = bool(params.get("structured"))
        constraint = None
        max_tokens = cfg.max_tokens
        if structured:
            max_chars = structured_chars(cfg.max_tokens, fitted.room)
            constraint = Constraint(regex=score_regex(max_chars))
            # enough tokens for the longest constrained verdict (the server clamps to its context)
            max_tokens = 4 * max_chars + 16

        if cfg.mode == "sample":
            outs = await self._generate(
                prompt,
                n=n,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_tokens=max_tokens,
                constraint=constraint,
            )
            if isinstance(outs, str):
                return [Verdict(text="", failure=outs) for _ in range(n)]
            return [self._sample_verdict(o, structured, extra) for o in outs]

        if source == "prefill":
            outs = await self._generate(
                prompt,
                n=1,
                temperature=0.0,
                top_p=1.0,
                max_tokens=1,
                prefill=SCORE_PREFILL,
                top_logprobs=cfg.top_logprobs,
                label_tokens=SCORE_DIGITS,
            )
            if isinstance(outs, str):
                return [Verdict(text="", failure=outs)]
            out = outs[0]
            top = out.top_logprobs[0] if out.top_logprobs else None
            return [self._logprob_verdict(SCORE_PREFILL + out.text, top, {**extra, "source": "prefill"})]

        outs = await self._generate(
            prompt,
            n=1,
            temperature=0.0,
            top_p=1.0,
            max_tokens=max_tokens,
            constraint=constraint,
            top_logprobs=cfg.top_logprobs,
            label_tokens=SCORE_DIGITS,
        )
        if isinstance(outs, str):
            return [Verdict(text="", failure=outs)]
        out = outs[0]
        if out.blocked:
            return [Verdict(text=out.text, failure=f"blocked: {out.blocked}", **extra)]
        pos = score_position(out.tokens) if out.tokens else None
        if pos is None or not out.top_logprobs or pos >= len(out.top_logprobs):
            if not out.top_logprobs:
                failure = "no_logprobs: the backend returned no logprobs for this model"
            else:
                failure = parse_score(out.text)[1] or "no_score_token"
            return [Verdict(text=out.text, failure=failure, finish_reason=out.finish_reason, **extra)]
        return [self._logprob_verdict(out.text, out.top_logprobs[pos], {**extra, "source": "verdict"})]

    @staticmethod
    def _sample_verdict(out: Output, structured: bool, extra: dict[str, Any]) -> Verdict:
        if out.blocked:
            return Verdict(text=out.text, failure=f"blocked: {out.blocked}", **extra)
        score, failure = parse_score(out.text)
        return Verdict(
            text=out.text,
            score=score,
            failure=failure,
            finish_reason=out.finish_reason,
            constrained=structured,
            **extra,
        )

    @staticmethod
    def _logprob_verdict(text: str, top: dict[str, float] | None, extra: dict[str, Any]) -> Verdict:
        if not top:
            return Verdict(text=text, failure="no_logprobs: the backend returned no logprobs", **extra)
        score, probs, mass = expected_score(top)
        if score is None:
            return Verdict(
                text=text, failure="no_score_tokens: no digit 0-5 among the returned logprobs", **extra
            )
        return Verdict(text=text, score=score, probs=probs, digit_mass=mass, **extra)

    # ------------------------------------------------------------ pairwise

    async def _compare_params(self) -> dict[str, Any]:
        caps = await self._caps()
        params: dict[str, Any] = {"mode": self.mode, "max_response_chars": self.config.max_response_chars}
        if self.mode == "sample":
            params["structured"] = self.config.structured and caps.structured
        else:
            params["top_logprobs"] = self.config.top_logprobs
        return params

    async def compare(self, instruction: str, response_a: str, response_b: str) -> CompareResult:
        params = await self._compare_params()
        a, cut_a = truncate_chars(response_a, self.config.max_response_chars)
        b, cut_b = truncate_chars(response_b, self.config.max_response_chars)
        # the cache key names the pair as shown (output_1, output_2): compare(a, b)'s "ba" order is
        # compare(b, a)'s "ab" order
        shown = {"ab": (response_a, response_b), "ba": (response_b, response_a)}
        texts = {"ab": (a, b), "ba": (b, a)}
        keys = {
            order: cache_key(
                judge=self.name,
                template_sha256=self.compare_template.sha256,
                task="compare",
                params=params,
                sample=0,
                instruction=instruction,
                responses=list(shown[order]),
            )
            for order in ("ab", "ba")
        }
        hits = await self.cache.get_many([keys["ab"], keys["ba"]]) if self.cache is not None else [None, None]
        self.observer.cache(sum(h is not None for h in hits), sum(h is None for h in hits))
        raw: dict[str, ShownVerdict] = {}
        cached: dict[str, bool] = {}
        todo = []
        for order, hit in zip(("ab", "ba"), hits, strict=True):
            if hit is not None:
                raw[order], cached[order] = ShownVerdict.model_validate(hit), True
            else:
                todo.append(order)
        fresh = await asyncio.gather(*(self._pair_verdict(instruction, *texts[o], params) for o in todo))
        to_cache = {}
        context_cut = False
        for order, (verdict, was_cut) in zip(todo, fresh, strict=True):
            raw[order], cached[order] = verdict, False
            context_cut = context_cut or was_cut
            if verdict.failure is not None:
                self._failed(verdict.failure)
            if is_cacheable(verdict.failure):
                to_cache[keys[order]] = verdict.model_dump(mode="json", exclude_unset=True)
        if self.cache is not None:
            await self.cache.put_many(to_cache)
        ab = self._oriented("ab", raw["ab"], cached["ab"])
        ba = self._oriented("ba", raw["ba"], cached["ba"])
        preference, failure = _preference(ab, ba, self.mode)
        return CompareResult(
            preference=preference,
            ab=ab,
            ba=ba,
            failure=failure,
            truncated=cut_a or cut_b or context_cut,
            template_sha256=self.compare_template.sha256,
            judge=self.name,
            mode=self.mode,
        )

    @staticmethod
    def _oriented(order: Literal["ab", "ba"], raw: ShownVerdict, cached: bool) -> PairVerdict:
        """A verdict about (output_1, output_2) expressed in the caller's A/B terms."""
        first, p_first = raw.first, raw.p_first
        a_is_first = order == "ab"
        winner = None
        if first in (1, 2):
            winner = "A" if (first == 1) == a_is_first else "B"
        p_a = None
        if p_first is not None:
            p_a = p_first if a_is_first else 1.0 - p_first
        return PairVerdict(
            order=order, text=raw.text, winner=winner, p_a=p_a, failure=raw.failure, cached=cached
        )

    async def _pair_verdict(
        self, instruction: str, out1: str, out2: str, params: dict[str, Any]
    ) -> tuple[ShownVerdict, bool]:
        fitted = await self._fit(
            self.compare_template, instruction, [out1, out2], ("output_1", "output_2"), SHORT_RESERVE, None
        )
        prompt, cut = fitted.prompt, fitted.cut
        if prompt is None:
            return ShownVerdict(text="", failure=CONTEXT_OVERFLOW), cut
        if self.mode == "sample":
            structured = bool(params.get("structured"))
            outs = await self._generate(
                prompt,
                n=1,
                temperature=0.0,
                top_p=1.0,
                max_tokens=SHORT_RESERVE,
                constraint=Constraint(choice=PAIR_IDS) if structured else None,
            )
            if isinstance(outs, str):
                return ShownVerdict(text="", failure=outs), cut
            out = outs[0]
            if out.blocked:
                return ShownVerdict(text=out.text, failure=f"blocked: {out.blocked}"), cut
            first, failure = parse_winner(out.text)
            return ShownVerdict(text=out.text, first=first, failure=failure, constrained=structured), cut
        outs = await self._generate(
            prompt,
            n=1,
            temperature=0.0,
            top_p=1.0,
            max_tokens=1,
            top_logprobs=self.config.top_logprobs,
            label_tokens=PAIR_IDS,
        )
        if isinstance(outs, str):
            return ShownVerdict(text="", failure=outs), cut
        out = outs[0]
        if not out.top_logprobs:
            return ShownVerdict(text=out.text, failure="no_logprobs: the backend returned no logprobs"), cut
        probs, mass = label_distribution(out.top_logprobs[0], PAIR_IDS)
        if not probs:
            return ShownVerdict(
                text=out.text, failure="no_label_tokens: neither m nor M among the logprobs"
            ), cut
        p_first = probs.get(PAIR_IDS[0], 0.0)
        first = 1 if p_first > 0.5 else 2 if p_first < 0.5 else None
        return ShownVerdict(text=out.text, first=first, p_first=p_first, mass=mass, failure=None), cut

    # ------------------------------------------------------------ lifecycle

    def with_config(self, config: JudgeConfig) -> LLMJudge:
        """A judge with other settings (e.g. mode) sharing this one's backend, so its concurrency
        bound and rate limit, and its cache. Backend settings (limits, retries) stay this judge's."""
        return LLMJudge(self.spec, config, self.backend, self.cache, self.observer, self.owns_cache)

    async def aclose(self) -> None:
        await self.backend.aclose()
        if self.cache is not None and self.owns_cache:
            await self.cache.aclose()

    async def __aenter__(self) -> LLMJudge:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _preference(ab: PairVerdict, ba: PairVerdict, mode: Mode) -> tuple[float, str | None]:
    failures = [f"{v.order}: {v.failure}" for v in (ab, ba) if v.failure is not None]
    if failures:
        return 0.5, "; ".join(failures)
    if mode == "logprob" and ab.p_a is not None and ba.p_a is not None:
        if (ab.p_a - 0.5) * (ba.p_a - 0.5) > 0:
            return (ab.p_a + ba.p_a) / 2, None
        return 0.5, None
    if ab.winner is None or ba.winner is None:
        return 0.5, None
    if ab.winner == ba.winner:
        return (1.0 if ab.winner == "A" else 0.0), None
    return 0.5, None


def make_judge(
    spec: str,
    config: JudgeConfig,
    *,
    policy_url: str | None = None,
    self_model: str | None = None,
    teacher: TeacherConfig | None = None,
    redis_url: str | None = None,
    observer: JudgeObserver | None = None,
    client: OpenAICompatClient | None = None,
    cache: VerdictCache | None = None,
) -> LLMJudge:
    """Build a judge from a spec (see selfreward.llm.specs) and the judge config.

    `cache`: a verdict cache shared with other judges (left open by this judge's `aclose`);
    default: its own, on `redis_url` (in-process without one). `redis_url` also holds the
    backend's limits, shared with every process judging with the same backend there
    (selfreward.llm.limits.SharedLimits; in-process without one, and for `policy:` judges).

    `client`: the caller's open client of the policy service (a stage's); a judge on that
    server shares its connection pool (selfreward.llm.make_backend)."""
    resolved = parse_spec(spec, self_model=self_model, policy_url=policy_url)
    if resolved.kind == "gemini" and config.mode == "logprob" and config.logprob_source == "prefill":
        raise ConfigError(
            [
                f"judge {resolved.name}: judge.logprob_source=prefill needs a backend that continues a "
                "prefilled answer (vLLM); Gemini supports logprob_source: verdict (or auto)"
            ],
            "judge",
        )
    observer = observer or JudgeObserver()
    events = BackendEvents(on_call=observer.backend_call, on_retry=observer.retry)
    backend = make_backend(
        resolved, config, teacher=teacher, events=events, client=client, redis_url=redis_url
    )
    if not config.cache:
        return LLMJudge(resolved, config, backend, None, observer)
    if cache is not None:
        return LLMJudge(resolved, config, backend, cache, observer, owns_cache=False)
    return LLMJudge(resolved, config, backend, VerdictCache(redis_url, ttl_s=config.cache_ttl_s), observer)


def make_run_judge(
    spec: str,
    run: RunConfig,
    *,
    policy_url: str | None = None,
    self_model: str | None = None,
    redis_url: str | None = None,
    judge_config: JudgeConfig | None = None,
    client: OpenAICompatClient | None = None,
) -> LLMJudge:
    """`make_judge` for a run: its judge and teacher sections (or `judge_config` in place of the
    judge section) and its policy service unless `policy_url` names another."""
    return make_judge(
        spec,
        judge_config or run.judge,
        policy_url=policy_url or run.services.policy_url,
        self_model=self_model,
        teacher=run.teacher,
        redis_url=redis_url,
        client=client,
    )
