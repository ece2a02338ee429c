"""LLM-as-a-Judge (docs/judge.md): one judge protocol, in process or over HTTP.

    from selfreward.judging import make_judge, make_run_judge
    judge = make_judge("policy:self", config.judge, policy_url=..., self_model="m1", redis_url=...)
    judge = make_run_judge("policy:self", run_config, self_model="m1")  # judge/teacher/services
    results = await judge.score(instruction, responses)              # list[ScoreResult]
    comp = await judge.compare(instruction, response_a, response_b)  # CompareResult
    await judge.aclose()

- `protocol`: the `Judge` protocol, its typed results, the failure rule;
- `judge`: `LLMJudge` (a model through selfreward.llm), `make_judge`, `make_run_judge`;
- `remote`: `RemoteJudge`, the same protocol answered by the judge service;
- `rows`: `judge_rows`, the one resumable loop every judgments file is written by;
- `files`: candidates -> judgments.jsonl, answer pairs -> comparisons;
- `parsing`, `truncation`, `cache`: the strict verdict rules, the truncation rule, the verdict cache.
"""

from selfreward.judging.cache import VerdictCache, cache_key
from selfreward.judging.files import acompare_rows, ajudge_candidates, judge_candidates, read_judge_inputs
from selfreward.judging.judge import LLMJudge, make_judge, make_run_judge
from selfreward.judging.parsing import expected_score, parse_score, parse_winner
from selfreward.judging.protocol import (
    CompareResult,
    Judge,
    JudgeObserver,
    PairVerdict,
    ScoreResult,
    ShownVerdict,
    failure_kind,
    is_transient,
)
from selfreward.judging.remote import RemoteJudge
from selfreward.judging.rows import Judged, judge_rows
from selfreward.judging.truncation import TRUNCATION_MARK, truncate_chars

__all__ = [
    "TRUNCATION_MARK",
    "CompareResult",
    "Judge",
    "JudgeObserver",
    "Judged",
    "LLMJudge",
    "PairVerdict",
    "RemoteJudge",
    "ScoreResult",
    "ShownVerdict",
    "VerdictCache",
    "acompare_rows",
    "ajudge_candidates",
    "cache_key",
    "expected_score",
    "failure_kind",
    "is_transient",
    "judge_candidates",
    "judge_rows",
    "make_judge",
    "make_run_judge",
    "parse_score",
    "parse_winner",
    "read_judge_inputs",
    "truncate_chars",
]
