"""EFT targets: the rank mapping, the judge-filtered method (Yuan et al. 2024), chat examples."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from selfreward.config import DataConfig
from selfreward.data import eft_messages, ift_messages, prepare_seed, rank_score
from selfreward.data.chat import judge_target, justification_of
from selfreward.data.seed import VERDICTS_FILE
from selfreward.data.targets import (
    RANK_JUSTIFICATIONS,
    EFTGroup,
    EFTReply,
    agrees_with_humans,
    downsample_most_frequent,
    rank_targets,
)
from selfreward.errors import ConfigError
from selfreward.judging import Judge, ScoreResult, parse_score
from selfreward.prompts import JUDGE_TEMPLATE, load_template
from selfreward.schemas import Verdict
from selfreward.storage import load_jsonl

# ------------------------------------------------------------------ rank mode


def test_rank_mapping_is_linear_from_5_to_2() -> None:
    table = {k: [rank_score(p, k) for p in range(k)] for k in range(2, 7)}
    assert table == {
        2: [5, 2],
        3: [5, 3, 2],
        4: [5, 4, 3, 2],
        5: [5, 4, 3, 3, 2],
        6: [5, 4, 4, 3, 3, 2],
    }
    with pytest.raises(ValueError, match="k >= 2"):
        rank_score(0, 1)
    with pytest.raises(ValueError):
        rank_score(3, 3)


def test_rank_targets_use_distinct_ranks_and_templated_justifications() -> None:
    group = EFTGroup(
        "p", "t", "Q?", (EFTReply("a", "A", 0), EFTReply("b", "B", 0), EFTReply("c", "C", 2))
    )  # a tie at rank 0, a gap before 2: two distinct ranks
    rows = rank_targets(group)
    assert [(r["id"], r["human_rank"], r["score"]) for r in rows] == [("a", 0, 5), ("b", 0, 5), ("c", 2, 2)]
    assert rows[2]["justification"] == RANK_JUSTIFICATIONS[2] and rows[0]["n_ranked"] == 3
    assert all("rank" not in j.lower() for j in RANK_JUSTIFICATIONS.values())  # a judge never sees ranks


# ------------------------------------------------------------------ judge-filtered pieces


def test_agreement_requires_strict_order_on_differently_ranked_pairs() -> None:
    assert agrees_with_humans([0, 1, 2], [5, 3, 1])
    assert not agrees_with_humans([0, 1, 2], [5, 3, 3])  # a tie between different ranks
    assert not agrees_with_humans([0, 1], [2, 4])  # inverted
    assert agrees_with_humans([0, 0, 1], [4, 5, 2])  # equal human ranks are not compared
    assert not agrees_with_humans([0, 0, 1], [4, 2, 2])
    assert agrees_with_humans([2, 0], [1, 4])  # order of the lists does not matter


def test_downsampling_cuts_the_most_frequent_score_to_the_second() -> None:
    rows = [{"id": f"r{i}", "score": s} for i, s in enumerate([4] * 10 + [3] * 6 + [2] * 2)]
    out, removed = downsample_most_frequent(rows, "salt")
    assert removed == 4 and Counter(r["score"] for r in out) == {4: 6, 3: 6, 2: 2}
    assert [r["id"] for r in out] == [r["id"] for r in rows if r in out]  # order kept
    again, _ = downsample_most_frequent(rows, "salt")
    assert again == out  # seeded: the same rows every time
    other = downsample_most_frequent(rows, "another-salt")[0]
    assert {r["id"] for r in other if r["score"] == 4} != {r["id"] for r in out if r["score"] == 4}
    tie = [{"id": f"r{i}", "score": s} for i, s in enumerate([4, 4, 3, 3, 2])]
    assert downsample_most_frequent(tie, "salt") == (tie, 0)


def test_chat_examples_share_the_judge_format() -> None:
    ift = {"id": "p", "tree_id": "t", "prompt": "Why?", "response": "Because."}
    assert ift_messages(ift) == [
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Because."},
    ]
    eft = {**ift, "score": 4, "justification": "Mostly right."}
    user, assistant = eft_messages(eft)
    template = load_template(JUDGE_TEMPLATE, kind="score")
    assert user == {"role": "user", "content": template.render(instruction="Why?", response="Because.")}
    assert assistant == {"role": "assistant", "content": "Mostly right.\nScore: 4"}
    assert judge_target("", 3) == "Score: 3"
    assert justification_of("Good answer.\n**Score:** 4") == "Good answer."
    assert (
        justification_of("The score: is debatable. Relevant.\nscore: 2.")
        == "The score: is debatable. Relevant."
    )
    assert justification_of("no label here") == "no label here"


# ------------------------------------------------------------------ judge-filtered, end to end


def tree(tid: str, *replies: tuple[str, int, str]) -> dict[str, Any]:
    return {
        "message_tree_id": tid,
        "prompt": {
            "message_id": tid,
            "text": f"question {tid}?",
            "role": "prompter",
            "lang": "en",
            "replies": [
                {"message_id": mid, "text": text, "role": "assistant", "lang": "en", "rank": rank}
                for mid, rank, text in replies
            ],
        },
    }


class TableJudge:
    """A scripted Judge (selfreward.judging.protocol): the verdict for a reply is looked up by
    the reply's text and read with the strict 'Score: N' rule."""

    mode = "sample"
    concurrency = 4
    template = load_template(JUDGE_TEMPLATE, kind="score")
    compare_template = load_template("builtin:alpacaeval-pairwise", kind="compare")

    def __init__(self, verdicts: dict[str, str], name: str = "table-judge") -> None:
        self.verdicts = verdicts
        self.name = name
        self.calls: list[str] = []
        self.lock = threading.Lock()

    @property
    def identity(self) -> str:
        return self.name

    def verdict(self, response: str) -> ScoreResult:
        with self.lock:
            self.calls.append(response)
        text = self.verdicts[response]
        score, failure = parse_score(text)
        return ScoreResult(
            score=score,
            verdicts=[Verdict(text=text, score=score, failure=failure)],
            failures=int(score is None),
            truncated=False,
            template_sha256=self.template.sha256,
            judge=self.name,
            mode="sample",
        )

    async def score(self, instruction: str, responses: Any, samples: int | None = None) -> list[ScoreResult]:
        assert samples == 1  # one sampled verdict per EFT reply
        return [self.verdict(r) for r in responses]

    async def compare(self, instruction: str, response_a: str, response_b: str) -> Any:
        raise AssertionError("EFT targets never compare")

    async def aclose(self) -> None:
        pass


def judged_source(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    trees = [
        tree("agree-1", ("a1", 0, "A1"), ("a2", 1, "A2"), ("a3", 2, "A3")),
        tree("agree-2", ("b1", 0, "B1"), ("b2", 1, "B2")),
        tree("agree-3", ("c1", 0, "C1"), ("c2", 1, "C2")),
        tree("agree-4", ("e1", 0, "E1"), ("e2", 1, "E2")),
        tree("tie", ("d1", 0, "D1"), ("d2", 1, "D2")),
        tree("inverted", ("f1", 0, "F1"), ("f2", 1, "F2")),
        tree("unparseable", ("g1", 0, "G1"), ("g2", 1, "G2")),
    ]
    verdicts = {
        "A1": "Complete and precise.\nScore: 5", "A2": "Good, a little long.\nScore: 4",
        "A3": "Partial.\nScore: 2",
        "B1": "Helpful.\nScore: 4", "B2": "Vague.\nScore: 3",
        "C1": "Helpful.\nScore: 4", "C2": "Off topic.\nScore: 1",
        "E1": "Direct and right.\nScore: 4", "E2": "Some of it.\nScore: 2",
        "D1": "Fine.\nScore: 3", "D2": "Also fine.\nScore: 3",
        "F1": "Weak.\nScore: 2", "F2": "Strong.\nScore: 4",
        "G1": "Good.\nScore: 4", "G2": "I cannot decide.",
    }  # fmt: skip
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(t) + "\n" for t in trees), encoding="utf-8")
    return src, verdicts


def test_judge_filtered_keeps_agreeing_groups_and_downsamples(tmp_path: Path) -> None:
    src, verdicts = judged_source(tmp_path)
    config = DataConfig(
        source=str(src), eval_fraction=0.0, eft_targets="judge-filtered", eft_judge="policy:m1"
    )
    judge = TableJudge(verdicts)
    assert isinstance(judge, Judge)
    m = prepare_seed(config, tmp_path / "out", judge=judge, judge_concurrency=3)
    assert sorted(judge.calls) == sorted(verdicts)  # one call per reply
    assert m.dropped["eft_train.judge_disagrees"] == 2  # tie, inverted
    assert m.dropped["eft_train.judge_unparseable"] == 1
    info = m.eft_targets
    assert (
        info["mode"] == "judge-filtered" and info["judge"] == "table-judge" and info["new_judge_calls"] == 15
    )
    # kept before downsampling: 5 4 2 | 4 3 | 4 1 | 4 2 -> score 4 is most frequent (4), then 2 (2)
    assert info["scores_before"] == {"1": 1, "2": 2, "3": 1, "4": 4, "5": 1}
    assert info["scores_after"] == {"1": 1, "2": 2, "3": 1, "4": 2, "5": 1}
    assert m.dropped["eft_train.downsampled"] == 2
    rows = load_jsonl(tmp_path / "out" / "eft_train.jsonl")
    assert len(rows) == 7 and {r["targets"] for r in rows} == {"judge-filtered"}
    a1 = next(r for r in rows if r["id"] == "a1")
    assert (a1["score"], a1["justification"], a1["human_rank"]) == (5, "Complete and precise.", 0)
    assert eft_messages(a1)[1]["content"] == "Complete and precise.\nScore: 5"
    assert not {r["prompt_id"] for r in rows} & {"tie", "inverted", "unparseable"}
    # the verdicts are kept beside the outputs, one line per judged reply
    assert len(load_jsonl(tmp_path / "out" / VERDICTS_FILE)) == 15
    # a rebuild asks the judge nothing new and writes the same bytes
    before = (tmp_path / "out" / "eft_train.jsonl").read_bytes()
    again = prepare_seed(config, tmp_path / "out", judge=TableJudge(verdicts), force=True)
    assert again.eft_targets["new_judge_calls"] == 0
    assert (tmp_path / "out" / "eft_train.jsonl").read_bytes() == before
    # the folder is up to date for this judge, not for another one
    assert prepare_seed(config, tmp_path / "out", judge=TableJudge(verdicts)).reused
    other = TableJudge(verdicts, name="another-judge")
    assert not prepare_seed(config, tmp_path / "out", judge=other).reused and len(other.calls) == 15


def test_judge_filtered_resumes_after_a_crash(tmp_path: Path) -> None:
    src, verdicts = judged_source(tmp_path)
    config = DataConfig(
        source=str(src), eval_fraction=0.0, eft_targets="judge-filtered", eft_judge="policy:m1"
    )

    class Crashing(TableJudge):
        def verdict(self, response: str) -> ScoreResult:
            if len(self.calls) >= 6:
                raise RuntimeError("judge backend went away")
            return super().verdict(response)

    with pytest.raises(RuntimeError, match="went away"):
        prepare_seed(config, tmp_path / "out", judge=Crashing(verdicts), judge_concurrency=1)
    assert len(load_jsonl(tmp_path / "out" / VERDICTS_FILE)) == 6
    judge = TableJudge(verdicts)
    m = prepare_seed(config, tmp_path / "out", judge=judge)
    assert len(judge.calls) == 9 and m.eft_targets["new_judge_calls"] == 9 and m.counts["eft_train"] == 7


def test_judge_calls_are_bounded_by_the_judge_concurrency(tmp_path: Path) -> None:
    src, verdicts = judged_source(tmp_path)
    config = DataConfig(
        source=str(src), eval_fraction=0.0, eft_targets="judge-filtered", eft_judge="policy:m1"
    )
    in_flight, peak = 0, 0

    class SlowJudge(TableJudge):
        async def score(
            self, instruction: str, responses: Any, samples: int | None = None
        ) -> list[ScoreResult]:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.01)
            in_flight -= 1
            return await super().score(instruction, responses, samples)

    prepare_seed(config, tmp_path / "slow", judge=SlowJudge(verdicts), judge_concurrency=4)
    assert peak == 4
    prepare_seed(config, tmp_path / "fast", judge=TableJudge(verdicts))
    name = "eft_train.jsonl"
    assert (tmp_path / "slow" / name).read_bytes() == (tmp_path / "fast" / name).read_bytes()


def test_judge_filtered_needs_a_judge(tmp_path: Path) -> None:
    config = DataConfig(source="demo", eft_targets="judge-filtered", eft_judge="policy:m1")
    with pytest.raises(ConfigError, match="'judge-filtered' needs a judge"):
        prepare_seed(config, tmp_path)
