"""The meta-judge of Meta-Rewarding (Wu et al. 2024): the model compares two of its own judgments.

`MetaJudge.battle(instruction, response, a, b)` shows the two judgments of one response to the
meta-judge in both orders (the paper's prompt, `builtin:meta-judge`) and reads the strict label
`Winner: Judgement A|B` (the last one; "Judgment" is accepted too). Rules, as NeMo-Aligner's
implementation of the method (docs/methods.md says where the paper differs):
- the judgments are shown without their "Score: N" lines, so the meta-judge weighs the reasoning,
  not the number (the paper reports a strong bias toward the higher-scoring judgment);
- outcome "a" or "b" only when the same judgment wins in both orders; the same letter in both
  orders (position bias) is a tie; a failure in either order fails the battle (counted);
- a backend failure is transient (never cached, retried on the next run); verdicts are cached
  like every other (`selfreward.judging.cache`), by template, judge, parameters and order.

`elo(n, battles)` turns a response's battles into Elo scores: the Bradley-Terry maximum
likelihood (ties count half a win for each side), with a small L2 term so that a judgment that
wins everything still gets a finite score, on the Elo scale 1000 + 400 log10(odds).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from selfreward.judging.cache import cache_key
from selfreward.judging.judge import CONTEXT_OVERFLOW, STRUCTURED_TAIL, LLMJudge
from selfreward.judging.protocol import is_cacheable, is_transient
from selfreward.llm.backend import Constraint
from selfreward.prompts import META_JUDGE_TEMPLATE, Template, load_template

WINNER = re.compile(r"winner\s*:\s*\[?\s*judge?ment\s+([ab])\b", re.IGNORECASE)
SCORE_LINE = re.compile(r"(?i)(?:score|points)\s*:\s*[0-9.]+")
ELO_BASE, ELO_SCALE, L2 = 1000.0, 400.0, 0.01


def parse_meta_winner(text: str) -> tuple[Literal["A", "B"] | None, str | None]:
    """(the last "Winner: Judgement A|B" label, or None with the failure)."""
    found = WINNER.findall(text)
    if not found:
        return None, "unparseable: no 'Winner: Judgement A|B' label"
    return ("A" if found[-1].lower() == "a" else "B"), None


def strip_scores(judgment: str) -> str:
    """A judgment without its numeric score lines (what the meta-judge is shown)."""
    return SCORE_LINE.sub("", judgment).strip()


def meta_regex(max_chars: int) -> str:
    return r"(?:[\s\S]{0," + str(max_chars) + r"}\n)?Winner: Judgement [AB]"


class MetaVerdict(BaseModel):
    """The meta-judge's answer for one order (which shown judgment, A = the one shown first)."""

    text: str
    winner: Literal["A", "B"] | None = None
    failure: str | None = None
    cached: bool = False


class Battle(BaseModel):
    a: int  # index of the first judgment in the response's list
    b: int
    ab: MetaVerdict  # judgment a shown as A
    ba: MetaVerdict  # judgment b shown as A
    outcome: Literal["a", "b", "tie", "failed"]

    @property
    def transient_failure(self) -> str | None:
        return next((v.failure for v in (self.ab, self.ba) if is_transient(v.failure)), None)


def outcome_of(ab: MetaVerdict, ba: MetaVerdict) -> Literal["a", "b", "tie", "failed"]:
    if ab.winner is None or ba.winner is None:
        return "failed"
    if ab.winner == "A" and ba.winner == "B":
        return "a"
    if ab.winner == "B" and ba.winner == "A":
        return "b"
    return "tie"


@dataclass
class MetaJudge:
    """The meta-judge over an `LLMJudge`'s backend, cache and sampling settings."""

    judge: LLMJudge
    template: Template
    max_tokens: int = 256
    strip: bool = True

    @classmethod
    def over(
        cls, judge: LLMJudge, template: str = META_JUDGE_TEMPLATE, max_tokens: int = 256, strip: bool = True
    ) -> MetaJudge:
        return cls(judge, load_template(template, kind="meta"), max_tokens, strip)

    @property
    def name(self) -> str:
        return self.judge.name

    def _params(self, structured: bool) -> dict[str, Any]:
        c = self.judge.config
        return {
            "temperature": c.temperature,
            "top_p": c.top_p,
            "max_tokens": self.max_tokens,
            "structured": structured,
            "strip_scores": self.strip,
        }

    async def order(self, instruction: str, response: str, first: str, second: str) -> MetaVerdict:
        """One order: `first` shown as Judgement A, `second` as Judgement B."""
        j = self.judge
        caps = await j._caps()
        structured = j.config.structured and caps.structured
        params = self._params(structured)
        shown = [strip_scores(first), strip_scores(second)] if self.strip else [first, second]
        key = cache_key(
            judge=j.name,
            template_sha256=self.template.sha256,
            task="meta",
            params=params,
            sample=0,
            instruction=instruction,
            responses=[response, *shown],
        )
        if j.cache is not None:
            (hit,) = await j.cache.get_many([key])
            if hit is not None:
                return MetaVerdict.model_validate({**hit, "cached": True})
        verdict = await self._ask(instruction, response, shown, structured)
        if verdict.failure is not None:
            j._failed(verdict.failure)
        if j.cache is not None and is_cacheable(verdict.failure):
            await j.cache.put_many({key: verdict.model_dump(mode="json", exclude={"cached"})})
        return verdict

    async def _ask(self, instruction: str, response: str, shown: list[str], structured: bool) -> MetaVerdict:
        j = self.judge
        fitted = await j._fit(
            self.template,
            instruction,
            [response, *shown],
            ("response", "judgment_a", "judgment_b"),
            self.max_tokens,
            None,
        )
        if fitted.prompt is None:
            return MetaVerdict(text="", failure=CONTEXT_OVERFLOW)
        constraint, max_tokens = None, self.max_tokens
        if structured:
            room = fitted.room
            max_chars = (
                min(3 * self.max_tokens, room - STRUCTURED_TAIL) if room is not None else 3 * self.max_tokens
            )
            constraint = Constraint(regex=meta_regex(max(0, max_chars)))
            max_tokens = 4 * max(0, max_chars) + 16
        outs = await j._generate(
            fitted.prompt,
            n=1,
            temperature=j.config.temperature,
            top_p=j.config.top_p,
            max_tokens=max_tokens,
            constraint=constraint,
        )
        if isinstance(outs, str):
            return MetaVerdict(text="", failure=outs)
        out = outs[0]
        if out.blocked:
            return MetaVerdict(text=out.text, failure=f"blocked: {out.blocked}")
        winner, failure = parse_meta_winner(out.text)
        return MetaVerdict(text=out.text, winner=winner, failure=failure)

    async def battle(self, instruction: str, response: str, judgments: list[str], a: int, b: int) -> Battle:
        """Judgments a and b of one response, in both orders."""
        ab = await self.order(instruction, response, judgments[a], judgments[b])
        ba = await self.order(instruction, response, judgments[b], judgments[a])
        return Battle(a=a, b=b, ab=ab, ba=ba, outcome=outcome_of(ab, ba))


def elo(n: int, battles: list[Battle]) -> list[float]:
    """Bradley-Terry maximum-likelihood Elo scores of n judgments (see the module docstring)."""
    import numpy as np
    from scipy.optimize import minimize

    wins = np.zeros((n, n))
    for bt in battles:
        if bt.outcome == "a":
            wins[bt.a, bt.b] += 1.0
        elif bt.outcome == "b":
            wins[bt.b, bt.a] += 1.0
        elif bt.outcome == "tie":
            wins[bt.a, bt.b] += 0.5
            wins[bt.b, bt.a] += 0.5

    def loss(x: Any) -> tuple[float, Any]:
        diff = x[:, None] - x[None, :]
        log_p = -np.logaddexp(0.0, -diff)  # log sigmoid(x_i - x_j)
        p = np.exp(log_p)
        value = -(wins * log_p).sum() + L2 * (x**2).sum()
        grad = -(wins * (1.0 - p)).sum(axis=1) + (wins.T * (1.0 - p.T)).sum(axis=1) + 2 * L2 * x
        return float(value), grad

    result = minimize(loss, np.zeros(n), jac=True, method="L-BFGS-B")
    return [round(ELO_BASE + ELO_SCALE * float(v) / math.log(10.0), 3) for v in result.x]
