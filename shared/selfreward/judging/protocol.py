"""The judge protocol: what every judge answers, in process or over HTTP, and the failure rule.

A judge (`Judge`) scores responses pointwise (`score`: K verdicts per response, their mean)
and compares two responses pairwise (`compare`: both orders). `selfreward.judging.judge.LLMJudge`
judges with a model through the LLM layer; `selfreward.judging.remote.RemoteJudge` asks the
judge service, which runs an LLMJudge. Everything that judges (the loop's judgment stage,
`selfreward judge score|compare`, judge-filtered EFT targets, the evaluation, the judge
service) takes a `Judge` and reads the typed results below.

Failures (a verdict's `failure` is "<kind>: <detail>"; `failure_kind` reads the kind):
- transient (`backend_error`: the backend failed after its retries): says nothing about the
  response; a record with one is not written to a results file, so the next run judges it again;
- not cacheable (`backend_error`, and `context_overflow`: the prompt does not fit this
  judge's context): also depends on the backend's state, so never cached;
- every other failure (unparseable, blocked, no score token, context overflow) is the judge's
  answer: recorded in the result and counted, never turned into a score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from selfreward.config import JudgeConfig
from selfreward.prompts import Template, load_template
from selfreward.schemas import Verdict

Mode = Literal["sample", "logprob"]

TRANSIENT_KINDS = frozenset({"backend_error"})
UNCACHED_KINDS = frozenset({"backend_error", "context_overflow"})


def failure_kind(failure: str) -> str:
    return failure.split(":", 1)[0].strip()


def is_transient(failure: str | None) -> bool:
    """A failure a later run may not meet (see the module docstring)."""
    return failure is not None and failure_kind(failure) in TRANSIENT_KINDS


def is_cacheable(failure: str | None) -> bool:
    return failure is None or failure_kind(failure) not in UNCACHED_KINDS


class ScoreResult(BaseModel):
    """A pointwise judgment of one response."""

    model_config = ConfigDict(protected_namespaces=())
    score: float | None  # mean of the parsed scores; None when every verdict failed
    verdicts: list[Verdict]
    failures: int
    truncated: bool
    template_sha256: str
    judge: str
    mode: Mode
    cached: int = 0  # verdicts served from the cache

    @property
    def transient_failure(self) -> str | None:
        """The first transient failure among the verdicts (the result must not be written)."""
        return next((v.failure for v in self.verdicts if is_transient(v.failure)), None)


class ShownVerdict(BaseModel):
    """A pairwise verdict about two outputs as the judge saw them (output_1, output_2): the
    form verdicts are cached in, whoever asked."""

    model_config = ConfigDict(extra="allow")
    text: str
    first: Literal[1, 2] | None = None  # which shown output won
    p_first: float | None = None  # logprob mode: probability that output_1 is better
    mass: float | None = None  # logprob mode: probability mass on the two identifiers
    failure: str | None = None
    constrained: bool | None = None


class PairVerdict(BaseModel):
    """One order of a comparison, in the caller's A/B terms."""

    order: Literal["ab", "ba"]  # ab: A shown as output_1; ba: A shown as output_2
    text: str
    winner: Literal["A", "B"] | None = None
    p_a: float | None = None  # logprob mode: probability that A is better in this order
    failure: str | None = None
    cached: bool = False


class CompareResult(BaseModel):
    """A pairwise judgment: preference 1.0 = A better, 0.0 = B better, 0.5 = tie/disagreement/failure."""

    preference: float
    ab: PairVerdict
    ba: PairVerdict
    failure: str | None
    truncated: bool
    template_sha256: str
    judge: str
    mode: Mode

    @property
    def transient_failure(self) -> str | None:
        return next((v.failure for v in (self.ab, self.ba) if is_transient(v.failure)), None)


@runtime_checkable
class Judge(Protocol):
    """What every judge offers (see the module docstring)."""

    @property
    def name(self) -> str:
        """The resolved judge spec, recorded in every result (e.g. policy:m1-0123abcd)."""
        ...

    @property
    def mode(self) -> Mode: ...

    @property
    def identity(self) -> str:
        """The judge and what decides its pointwise verdicts (template version, mode, sampling):
        records stored under another identity are judged again."""
        ...

    @property
    def concurrency(self) -> int:
        """Requests this judge's backend takes at once (callers keep about that many in flight)."""
        ...

    template: Template  # the pointwise prompt
    compare_template: Template  # the pairwise prompt

    async def score(
        self, instruction: str, responses: Sequence[str], samples: int | None = None
    ) -> list[ScoreResult]:
        """One result per response; K = `samples` or the judge's default (1 in logprob mode)."""
        ...

    async def compare(self, instruction: str, response_a: str, response_b: str) -> CompareResult: ...

    async def aclose(self) -> None:
        """Close the connections (the judge opens new ones if used again)."""
        ...


class ConfiguredJudge:
    """What a judge configured by a run's judge section answers from it: its mode, concurrency,
    templates and identity (`LLMJudge` and `RemoteJudge` share this); `name` is the subclass's."""

    config: JudgeConfig
    template: Template
    compare_template: Template

    def _load_templates(self) -> None:
        self.template = load_template(self.config.template, kind="score")
        self.compare_template = load_template(self.config.compare_template, kind="compare")

    @property
    def name(self) -> str:
        raise NotImplementedError

    @property
    def mode(self) -> Mode:
        return self.config.mode

    @property
    def concurrency(self) -> int:
        return self.config.concurrency

    @property
    def identity(self) -> str:
        c = self.config
        identity = (
            f"{self.name}|template={self.template.version}|T={c.temperature}|top_p={c.top_p}"
            f"|max_tokens={c.max_tokens}"
        )
        return identity if c.mode == "sample" else f"{identity}|mode={c.mode}"


class JudgeObserver:
    """Hooks for metrics (the HTTP service counts them in Prometheus); no-ops by default."""

    def cache(self, hits: int, misses: int) -> None:
        pass

    def failure(self, kind: str) -> None:
        pass

    def backend_call(self, backend: str, seconds: float, ok: bool) -> None:
        pass

    def retry(self, backend: str, exc: BaseException) -> None:
        pass
