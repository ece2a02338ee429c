from __future__ import annotations

import pytest

from selfreward.config import PromptsConfig
from selfreward.dedup import NearDuplicateIndex, rouge_l, tokens
from selfreward.schemas import CandidateRecord, JudgmentRecord, Verdict
from selfreward.stages.pairs import demonstration_pairs, reward_pairs, score_histogram
from selfreward.stages.prompts import batch_size, derived_seed, extract_task, judge_task


def test_rouge_l_hand_computed() -> None:
    # LCS("the cat sat on the mat", "the cat lay on a mat") = the cat on mat = 4
    a, b = tokens("The cat sat on the mat"), tokens("the cat lay on a mat")
    p, r = 4 / 6, 4 / 6
    assert rouge_l(a, b) == pytest.approx(2 * p * r / (p + r))
    assert rouge_l(tokens("x"), []) == 0.0


def test_near_duplicate_index() -> None:
    idx = NearDuplicateIndex(0.7)
    idx.add("Write a poem about the sea at night.")
    assert idx.check("write a poem about the sea at night")[0] == "exact_duplicate"
    assert idx.check("Write a short poem about the sea at night.")[0] == "near_duplicate"
    reason, best = idx.check("Explain how vaccines train the immune system.")
    assert reason is None and best < 0.7


def test_self_instruct_batches_are_sized_by_the_acceptance_so_far() -> None:
    from collections import Counter

    assert batch_size(16, Counter(), 16) == 16  # nothing judged yet: one attempt per prompt needed
    assert batch_size(40, Counter(), 16) == 16  # at most the concurrency
    # 8 of 16 kept: 3 more prompts take about 6 attempts (the quickstart's last batch of 16 had 13 too many)
    assert batch_size(3, Counter(accepted=8, exact_duplicate=8), 16) == 6
    assert (
        batch_size(2, Counter(accepted=8, exact_duplicate=6, not_needed=5), 16) == 4
    )  # not_needed is no verdict
    assert batch_size(1, Counter(exact_duplicate=20), 16) == 10  # nothing kept: a floor of 10%
    assert batch_size(1, Counter(accepted=3), 16) == 1


def test_extract_task() -> None:
    assert extract_task("Task 9: Describe a sunset.\nTask 10: Another one") == "Describe a sunset."
    assert extract_task('  "List three fruits."  ') == "List three fruits."
    assert extract_task("Explain gravity\nin simple words.") == "Explain gravity in simple words."


def test_judge_task_filters() -> None:
    cfg = PromptsConfig(min_words=3, max_words=6)
    idx = NearDuplicateIndex(0.7)
    assert judge_task("", cfg, idx)[0] == "empty"
    assert judge_task("Hi there", cfg, idx)[0] == "too_short"
    assert judge_task("one two three four five six seven", cfg, idx)[0] == "too_long"
    assert judge_task("Name three red fruits", cfg, idx)[0] is None


def test_derived_seed_is_stable() -> None:
    assert derived_seed(42, 1, "p") == derived_seed(42, 1, "p")
    assert derived_seed(42, 1, "p") != derived_seed(42, 2, "p")
    assert 0 <= derived_seed("x") < 2**31


def _cand(pid: str, i: int, text: str | None = None, teacher: bool = False) -> CandidateRecord:
    return CandidateRecord(
        id=f"{pid}:{i}",
        prompt_id=pid,
        prompt=f"prompt {pid}",
        index=i,
        text=text or f"{pid}-{i}",
        model="m",
        teacher=teacher,
    )


def _judg(pid: str, i: int, scores: list[float | None]) -> JudgmentRecord:
    verdicts = [Verdict(text="..", score=s, failure=None if s is not None else "unparseable") for s in scores]
    parsed = [s for s in scores if s is not None]
    return JudgmentRecord(
        id=f"{pid}:{i}",
        prompt_id=pid,
        index=i,
        judge="policy:m1",
        template_sha256="x",
        mode="sample",
        verdicts=verdicts,
        score=sum(parsed) / len(parsed) if parsed else None,
        failures=len(scores) - len(parsed),
    )


def test_reward_pairs_best_vs_worst_ties_and_failures() -> None:
    cands = [_cand(p, i) for p in ("a", "b", "c", "d") for i in range(3)]
    judgments = [
        # a: best 1 (4.5), worst 2 (1.0); the unparseable verdict of a:0 is excluded from its mean
        _judg("a", 0, [3.0, None]),
        _judg("a", 1, [4.0, 5.0]),
        _judg("a", 2, [1.0, 1.0]),
        # b: all equal -> tie
        _judg("b", 0, [3.0]),
        _judg("b", 1, [3.0]),
        _judg("b", 2, [3.0]),
        # c: only one scored candidate
        _judg("c", 0, [None]),
        _judg("c", 1, [2.0]),
        _judg("c", 2, [None, None]),
        # d: two candidates tie for best -> lowest index chosen; margin 0.5
        _judg("d", 0, [2.0]),
        _judg("d", 1, [2.5]),
        _judg("d", 2, [2.5]),
    ]
    pairs, report = reward_pairs(cands, judgments, min_margin=0.0)
    assert [p["prompt_id"] for p in pairs] == ["a", "d"]
    a, d = pairs
    assert (a["chosen_id"], a["rejected_id"], a["chosen_score"], a["rejected_score"]) == (
        "a:1",
        "a:2",
        4.5,
        1.0,
    )
    assert a["prompt"] == [{"role": "user", "content": "prompt a"}]
    assert a["chosen"] == [{"role": "assistant", "content": "a-1"}]
    assert (d["chosen_id"], d["rejected_id"]) == ("d:1", "d:0")
    assert report["dropped"] == {"fewer_than_two_scored": 1, "tie": 1}
    assert report["tie_rate"] == pytest.approx(1 / 3)
    assert report["verdicts"] == 16 and report["parse_failures"] == 4
    assert report["parse_failure_rate"] == pytest.approx(4 / 16)
    # margin: d's gap is 0.5, so a larger min_margin drops it as a tie
    pairs2, report2 = reward_pairs(cands, judgments, min_margin=0.5)
    assert [p["prompt_id"] for p in pairs2] == ["a"] and report2["dropped"]["tie"] == 2


def test_score_histogram_rounds_and_counts_unscored() -> None:
    hist = score_histogram([_judg("a", 0, [4.0, 5.0]), _judg("a", 1, [None]), _judg("a", 2, [1.0])])
    assert hist == {"1": 1, "5": 1, "unscored": 1}  # 4.5 rounds half up


def test_demonstration_pairs() -> None:
    cands = [
        _cand("a", -1, "teacher a", teacher=True),
        _cand("a", 0, "student a"),
        _cand("b", -1, "same", teacher=True),
        _cand("b", 0, "same"),
        _cand("c", 0, "student only"),
    ]
    pairs, report = demonstration_pairs(cands)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("teacher a", "student a")
    ]
    assert report["dropped"] == {"identical_answers": 1, "missing_answer": 1}
