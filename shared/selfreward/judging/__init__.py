"""LLM-as-a-Judge over the policy, Gemini or any OpenAI-compatible teacher (docs/judge.md).

from selfreward.judging import make_judge
judge = make_judge("policy:self", config.judge, policy_url=..., self_model="m1", redis_url=...)
judge = make_run_judge("policy:self", run_config, self_model="m1")  # the run's judge/teacher/services
results = await judge.score(instruction, responses)        # list[ScoreResult]
comp = await judge.compare(instruction, response_a, response_b)  # CompareResult
await judge.aclose()
"""

from selfreward.judging.cache import VerdictCache, cache_key
from selfreward.judging.judge import (
    CompareResult,
    Judge,
    JudgeObserver,
    PairVerdict,
    ScoreResult,
    make_judge,
    make_run_judge,
)
from selfreward.judging.parsing import expected_score, parse_score, parse_winner
from selfreward.judging.stage import acompare_rows, ajudge_candidates, judge_candidates, read_judge_inputs
from selfreward.judging.truncation import TRUNCATION_MARK, truncate_chars

__all__ = [
    "TRUNCATION_MARK",
    "CompareResult",
    "Judge",
    "JudgeObserver",
    "PairVerdict",
    "ScoreResult",
    "VerdictCache",
    "acompare_rows",
    "ajudge_candidates",
    "cache_key",
    "expected_score",
    "judge_candidates",
    "make_judge",
    "make_run_judge",
    "parse_score",
    "parse_winner",
    "read_judge_inputs",
    "truncate_chars",
]
