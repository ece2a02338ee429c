"""Reward-modeling metrics against hand-computed values (ties and unparseable scores included)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from selfreward.errors import InputError
from selfreward.evaluation.metrics.reward_model import (
    compare_with_human,
    compare_with_reference,
    read_scores,
    scores_record,
)
from selfreward.schemas import EFTEvalRecord


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def rec(
    pid: str, scores: list[float], contents: list[str] | None = None, keys: list[str] | None = None
) -> dict:
    keys = keys or [str(i) for i in range(len(scores))]
    contents = contents or [f"{pid}-answer-{k}" for k in keys]
    return {
        "prompt_id": pid,
        "prompt": f"question {pid}",
        "completion": {k: {"content": c, "score": s} for k, c, s in zip(keys, contents, scores, strict=True)},
    }


# ------------------------------------------------------------------ independent definitions (pooled checks)


def avg_ranks(xs: list[float]) -> list[float]:
    return [sum(y < x for y in xs) + (sum(y == x for y in xs) + 1) / 2 for x in xs]


def naive_spearman(x: list[float], y: list[float]) -> float:
    rx, ry = avg_ranks(x), avg_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return num / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def naive_tau_b(x: list[float], y: list[float]) -> float:
    c = d = tx = ty = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            sx, sy = (x[i] > x[j]) - (x[i] < x[j]), (y[i] > y[j]) - (y[i] < y[j])
            tx += sx == 0
            ty += sy == 0
            c += sx * sy > 0
            d += sx * sy < 0
    n0 = n * (n - 1) / 2
    return (c - d) / math.sqrt((n0 - tx) * (n0 - ty))


# ------------------------------------------------------------------ reference judge


@pytest.fixture()
def reference_files(tmp_path: Path) -> tuple[Path, Path]:
    scores = write_jsonl(
        tmp_path / "judge.jsonl",
        [
            rec("p1", [5, 3, -1]),
            rec("p2", [4, 4]),
            rec("p3", [5, 2]),
            rec("p4", [1]),  # only in the judge's file
        ],
    )
    reference = write_jsonl(
        tmp_path / "ref.jsonl",
        [
            rec("p1", [5, 4, 2]),
            rec("p2", [4, 4]),
            rec("p3", [3, 2, 4]),  # response "2" only in the reference
            rec("p5", [3]),  # only in the reference
        ],
    )
    return scores, reference


def test_reference_metrics_hand_computed(reference_files: tuple[Path, Path]) -> None:
    s_path, r_path = reference_files
    report = compare_with_reference(read_scores(s_path), read_scores(r_path))
    out = report.to_json()
    # compared (judge, reference): (5,5) (3,4) (-1,2) | (4,4) (4,4) | (5,3) (2,2)
    assert out["pairwise_accuracy"] == pytest.approx(4 / 7)  # equal scores
    assert out["five_best"] == pytest.approx(1 / 2)  # judge 5s: (5,5) yes, (5,3) no
    assert out["exact_match"] == pytest.approx(1 / 3)  # only p2 agrees everywhere
    # ranks of s = [6.5,3,1,4.5,4.5,6.5,2], of r = [7,5,1.5,5,5,3,1.5] (both mean 4)
    assert out["spearman"] == pytest.approx(17.5 / math.sqrt(27 * 25.5))
    # 13 concordant, 3 discordant of 21 pairs; 2 pairs tied in the judge, 4 in the reference
    assert out["kendall_tau"] == pytest.approx(10 / math.sqrt(19 * 17))
    assert out["parse_failure_rate"] == pytest.approx(1 / 7)
    assert out["reference_parse_failure_rate"] == 0.0
    assert out["prompts_compared"] == 3
    assert out["prompts_only_in_scores"] == 1 and out["prompt_ids_only_in_scores"] == ["p4"]
    assert out["prompts_only_in_reference"] == 1 and out["prompt_ids_only_in_reference"] == ["p5"]
    assert out["responses_compared"] == 7 and out["responses_only_in_reference"] == 1

    ex = out["excluding_unparseable"]  # (-1, 2) dropped
    assert ex["responses"] == 6
    assert ex["pairwise_accuracy"] == pytest.approx(4 / 6)
    assert ex["five_best"] == pytest.approx(1 / 2)
    assert ex["exact_match"] == pytest.approx(1 / 3)
    assert ex["spearman"] == pytest.approx(7.5 / math.sqrt(16.5 * 15.5))
    assert ex["kendall_tau"] == pytest.approx(5 / math.sqrt(13 * 12))


def test_reference_unparseable_on_both_sides_counts_as_equal_in_first_table(tmp_path: Path) -> None:
    """The seed study compared the recorded values: -1 == -1 agrees; the second table drops it."""
    s = read_scores(write_jsonl(tmp_path / "s.jsonl", [rec("p", [-1, 3])]))
    r = read_scores(write_jsonl(tmp_path / "r.jsonl", [rec("p", [-1, 2])]))
    out = compare_with_reference(s, r).to_json()
    assert out["pairwise_accuracy"] == pytest.approx(1 / 2)
    assert out["exact_match"] == 0.0
    assert out["excluding_unparseable"]["pairwise_accuracy"] == 0.0
    assert out["excluding_unparseable"]["responses"] == 1
    assert out["five_best"] is None  # no 5 given: undefined, not 0
    assert out["spearman"] == pytest.approx(1.0)  # (-1,-1), (3,2): same order
    assert out["excluding_unparseable"]["spearman"] is None  # one response: undefined
    assert out["parse_failure_rate"] == 0.5 and out["reference_parse_failure_rate"] == 0.5


def test_reference_fractional_scores_and_null(tmp_path: Path) -> None:
    s = read_scores(write_jsonl(tmp_path / "s.jsonl", [rec("p", [10 / 3, None, 5.0])]))
    r = read_scores(write_jsonl(tmp_path / "r.jsonl", [rec("p", [10 / 3, 1, 5])]))
    out = compare_with_reference(s, r).to_json()
    assert out["pairwise_accuracy"] == pytest.approx(2 / 3)
    assert out["five_best"] == 1.0
    assert out["parse_failures"] == 1


def test_reference_content_mismatch_names_both_places(tmp_path: Path) -> None:
    s = read_scores(write_jsonl(tmp_path / "s.jsonl", [rec("p", [3], ["one text"])]))
    r = read_scores(write_jsonl(tmp_path / "r.jsonl", [rec("p", [3], ["another text"])]))
    with pytest.raises(InputError, match=r"s\.jsonl:1.*'p'.*'0'.*r\.jsonl:1"):
        compare_with_reference(s, r)


def test_reference_nothing_shared_is_an_error(tmp_path: Path) -> None:
    s = read_scores(write_jsonl(tmp_path / "s.jsonl", [rec("a", [3])]))
    r = read_scores(write_jsonl(tmp_path / "r.jsonl", [rec("b", [3])]))
    with pytest.raises(InputError, match="share no prompt_id"):
        compare_with_reference(s, r)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            {"prompt_id": "x", "completion": {"0": {"score": 7}}},
            r"f\.jsonl:2 \(prompt_id x\).*completion\.0\.score.*outside",
        ),
        (
            {"prompt_id": "x", "completion": {"0": {"score": "4"}}},
            r"f\.jsonl:2.*completion\.0\.score.*got '4'",
        ),
        (
            {"prompt_id": "x", "completion": {"0": {"content": "c"}}},
            r"f\.jsonl:2.*completion\.0\.score' is missing",
        ),
        ({"prompt_id": "x", "completion": {}}, r"f\.jsonl:2.*'completion' must be a non-empty"),
        ({"completion": {"0": {"score": 1}}}, r"f\.jsonl:2: field 'prompt_id'"),
        (
            {"prompt_id": "a", "completion": {"0": {"score": 1}}},
            r"f\.jsonl:2: duplicate prompt_id 'a' \(first at .*f\.jsonl:1\)",
        ),
    ],
)
def test_bad_scores_records_name_file_line_and_field(tmp_path: Path, line: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "f.jsonl", [rec("a", [1]), line])
    with pytest.raises(InputError, match=message):
        read_scores(path)


# ------------------------------------------------------------------ human ranks


def eft(rid: str, ranks: list[int]) -> EFTEvalRecord:
    return EFTEvalRecord(
        id=rid,
        tree_id=f"t-{rid}",
        prompt=f"question {rid}",
        replies=[
            {"message_id": f"{rid}-m{i}", "text": f"{rid}-answer-{i}", "rank": r} for i, r in enumerate(ranks)
        ],
    )


@pytest.fixture()
def human_case(tmp_path: Path):
    records = [
        eft("e1", [0, 1, 2]),
        eft("e2", [1, 0]),
        eft("e3", [0, 1, 2]),
        eft("e4", [0, 1]),
        eft("e5", [0, 1]),  # not scored
    ]
    scores = write_jsonl(
        tmp_path / "scores.jsonl",
        [
            rec("e1", [4, 4, 1]),  # tie on the human-ordered pair (0, 1)
            rec("e2", [5, 3]),  # the judge prefers the human's second
            rec("e3", [5, -1, 2]),  # reply 1 unparseable
            rec("e4", [3, 1]),
        ],
    )
    return read_scores(scores), records


def test_human_metrics_hand_computed(human_case) -> None:
    scores, records = human_case
    out = compare_with_human(scores, records).to_json()
    # pairs: e1 3 (2 agree, 1 tie), e2 1 (disagree), e3 3 (2 agree: -1 is below 5; (-1, 2) disagrees), e4 1 agree
    assert out["pairs"] == 8 and out["judge_ties"] == 1
    assert out["pairwise_accuracy"] == pytest.approx(5 / 8)
    assert out["pairwise_accuracy_ties_half"] == pytest.approx(5.5 / 8)
    assert out["five_best"] == pytest.approx(1 / 2)  # e2 reply 0 (rank 1) no, e3 reply 0 (rank 0) yes
    assert out["exact_match"] == pytest.approx(1 / 4)  # only e4
    # per prompt (score vs -rank): e1 rho = 1.5/sqrt(1.5*2), tau-b = 2/sqrt(2*3); e2 -1, -1; e3 0.5, 1/3; e4 1, 1
    assert out["spearman"] == pytest.approx((1.5 / math.sqrt(3) - 1 + 0.5 + 1) / 4)
    assert out["kendall_tau"] == pytest.approx((2 / math.sqrt(6) - 1 + 1 / 3 + 1) / 4)
    s = [4, 4, 1, 5, 3, 5, -1, 2, 3, 1]
    g = [0, -1, -2, -1, 0, 0, -1, -2, 0, -1]
    assert out["spearman_pooled"] == pytest.approx(naive_spearman(s, g))
    assert out["kendall_tau_pooled"] == pytest.approx(naive_tau_b(s, g))
    assert out["correlation_prompts"] == 4 and out["correlation_undefined_prompts"] == 0
    assert out["parse_failure_rate"] == pytest.approx(1 / 10)
    assert out["prompts_compared"] == 4 and out["prompt_ids_only_in_reference"] == ["e5"]
    assert out["prompts_only_in_scores"] == 0

    ex = out["excluding_unparseable"]  # e3 reply 1 dropped: e3 keeps one agreeing pair
    assert ex["pairs"] == 6 and ex["judge_ties"] == 1
    assert ex["pairwise_accuracy"] == pytest.approx(4 / 6)
    assert ex["pairwise_accuracy_ties_half"] == pytest.approx(4.5 / 6)
    assert ex["exact_match"] == pytest.approx(2 / 4)  # e3 and e4
    assert ex["spearman"] == pytest.approx((1.5 / math.sqrt(3) - 1 + 1 + 1) / 4)
    assert ex["kendall_tau"] == pytest.approx((2 / math.sqrt(6) - 1 + 1 + 1) / 4)


def test_human_constant_scores_leave_the_correlation_mean(tmp_path: Path) -> None:
    records = [eft("a", [0, 1]), eft("b", [0, 1, 2])]
    scores = read_scores(write_jsonl(tmp_path / "s.jsonl", [rec("a", [3, 3]), rec("b", [1, 2, 3])]))
    out = compare_with_human(scores, records).to_json()
    assert out["correlation_prompts"] == 1 and out["correlation_undefined_prompts"] == 1
    assert out["spearman"] == pytest.approx(-1.0) and out["kendall_tau"] == pytest.approx(-1.0)
    assert out["pairwise_accuracy"] == 0.0 and out["pairwise_accuracy_ties_half"] == pytest.approx(0.5 / 4)
    assert out["exact_match"] == 0.0
    assert out["five_best"] is None


def test_human_ties_in_ranks_are_not_pairs(tmp_path: Path) -> None:
    records = [eft("a", [0, 1, 1])]
    scores = read_scores(write_jsonl(tmp_path / "s.jsonl", [rec("a", [5, 2, 3])]))
    out = compare_with_human(scores, records).to_json()
    assert out["pairs"] == 2 and out["pairwise_accuracy"] == 1.0 and out["exact_match"] == 1.0
    assert out["five_best"] == 1.0


def test_human_stale_scores_file_is_rejected(tmp_path: Path) -> None:
    records = [eft("a", [0, 1])]
    scores = read_scores(write_jsonl(tmp_path / "s.jsonl", [rec("a", [5, 2], ["a-answer-1", "a-answer-0"])]))
    with pytest.raises(InputError, match=r"s\.jsonl:1.*'a'.*'0'.*content differs"):
        compare_with_human(scores, records)


def test_scores_record_round_trip(tmp_path: Path) -> None:
    line = scores_record(
        "q", "question", [{"content": "x", "score": 4.5}, {"content": "y", "score": None}], judge="policy:m1"
    )
    assert line["completion"]["1"] == {"content": "y", "score": -1}
    parsed = read_scores(write_jsonl(tmp_path / "s.jsonl", [line]))["q"]
    assert parsed.responses["0"].score == 4.5 and parsed.responses["1"].score is None
