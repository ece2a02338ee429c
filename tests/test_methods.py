"""Feedback methods as plug-ins: the registry, the old variants' pairs unchanged, length control,
and the rules of Meta-Rewarding (meta-judge parsing, battles, Elo, judge-pair filters, mixing),
each on hand-built inputs with hand-computed expectations."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from selfreward.config import RunConfig
from selfreward.errors import ConfigError
from selfreward.judging.meta import Battle, MetaVerdict, elo, outcome_of, parse_meta_winner, strip_scores
from selfreward.methods import METHODS, method_named
from selfreward.methods.meta_reward import judge_pairs, mix
from selfreward.methods.method import with_kinds
from selfreward.schemas import CandidateRecord, JudgmentRecord, Verdict, candidate_id, read_records
from selfreward.stages.meta_judgments import pick_candidates
from selfreward.stages.pairs import LengthControl, demonstration_pairs, mean_lengths, reward_pairs

GOLDEN = Path(__file__).parent / "data" / "pairs-golden"


def test_the_registry_names_every_method_and_refuses_unknown_ones() -> None:
    assert list(METHODS) == [
        "self-reward",
        "teacher-reward",
        "teacher-demo",
        "meta-reward",
        "spin",
        "cream",
        "temporal",
    ]
    for m in METHODS.values():
        assert m.summary and m.paper and m.stages[0] == "prompts" and m.stages[-1] == "evaluate"
    assert "meta_judgments" in METHODS["meta-reward"].stages
    with pytest.raises(ConfigError, match="unknown method 'spin-x'; methods: self-reward, teacher-reward"):
        method_named("spin-x")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        RunConfig(variant="nope")
    with pytest.raises(ValueError, match="teacher.backend is required for variant 'teacher-demo'"):
        RunConfig(variant="teacher-demo")
    with pytest.raises(ValueError, match="meta-reward compares K judgments"):
        RunConfig(variant="meta-reward", judge={"mode": "logprob"})
    assert RunConfig(variant="teacher-reward", teacher={"backend": "gemini:g"}).feedback_judge() == "gemini:g"
    assert RunConfig(variant="teacher-demo", teacher={"backend": "gemini:g"}).feedback_judge() is None
    with pytest.raises(ValueError, match="variant 'spin' needs the seed IFT prompts"):
        RunConfig(variant="spin")
    assert RunConfig(variant="spin", prompts={"source": "seed-ift"}).feedback_judge() is None


# ---------------------------------------------------------------- the old variants, unchanged


def without_kind(rows: list[dict[str, Any]]) -> str:
    return "".join(
        json.dumps({k: v for k, v in r.items() if k != "kind"}, ensure_ascii=False, sort_keys=True) + "\n"
        for r in rows
    )


def test_the_three_old_variants_build_the_same_pairs_as_before() -> None:
    """tests/data/pairs-golden holds what the builders wrote before methods were plug-ins (commit
    d39d70f): the same bytes but for the new `kind` of each row."""
    candidates = read_records(GOLDEN / "candidates.jsonl", CandidateRecord)
    judgments = read_records(GOLDEN / "judgments.jsonl", JudgmentRecord)
    built = {
        "reward": reward_pairs(candidates, judgments, 0.0),
        "reward-margin1": reward_pairs(candidates, judgments, 1.0),
        "demo": demonstration_pairs(candidates),
    }
    for name, (rows, report) in built.items():
        assert without_kind(rows) == (GOLDEN / f"{name}.pairs.jsonl").read_text(), name
        assert report == json.loads((GOLDEN / f"{name}.report.json").read_text()), name
        assert {r["kind"] for r in rows} == {"demonstration" if name == "demo" else "actor"}
    rows, report = built["reward"]
    full = with_kinds(rows, report)
    assert full["pairs_by_kind"] == {"actor": 11} and full["dropped_by_reason"] == {"tie": 1}


# ---------------------------------------------------------------- length control


def cands(*texts_scores: tuple[str, float]) -> tuple[list[CandidateRecord], list[JudgmentRecord]]:
    c, j = [], []
    for i, (text, score) in enumerate(texts_scores):
        cid = candidate_id("p", i)
        c.append(CandidateRecord(id=cid, prompt_id="p", prompt="Q?", index=i, text=text, model="m"))
        j.append(
            JudgmentRecord(
                id=cid, prompt_id="p", index=i, judge="j", template_sha256="t", mode="sample",
                verdicts=[Verdict(text=f"Score: {score}", score=score)], score=score,
            )
        )  # fmt: skip
    return c, j


def pick(rows: list[dict[str, Any]]) -> tuple[str | None, str | None]:
    if not rows:
        return None, None
    return rows[0]["chosen"][0]["content"], rows[0]["rejected"][0]["content"]


def test_length_control_takes_the_shortest_top_and_the_longest_bottom() -> None:
    # scores 5, 4.5, 4, 2, 1: S_max 5, S_min 1
    c, j = cands(
        ("long best answer!!", 5), ("mid", 4.5), ("four point zero", 4), ("bad and very long", 2), ("b", 1)
    )
    assert pick(reward_pairs(c, j, 0.0)[0]) == ("long best answer!!", "b")  # no control: best vs worst
    # rho 0.2: top band [4.2, 5] = {5, 4.5} -> shortest "mid"; bottom band [1, 1.8] = {1} -> "b"
    assert pick(reward_pairs(c, j, 0.0, LengthControl(0.2))[0]) == ("mid", "b")
    # rho 0.3: top band [3.8, 5] adds 4.0; bottom band [1, 2.2] = {2, 1} -> longest "bad and very long"
    rows, report = reward_pairs(c, j, 0.0, LengthControl(0.3))
    assert pick(rows) == ("mid", "bad and very long") and report["length_control"] == {"rho": 0.3}
    # rho 0: equal top scores -> the shorter; equal bottom scores -> the longer
    c, j = cands(("a long top", 5), ("top", 5), ("x", 1), ("xxxx", 1))
    assert pick(reward_pairs(c, j, 0.0, LengthControl(0.0))[0]) == ("top", "xxxx")
    # rho 1: both bands hold every answer; the shortest scores below the longest: dropped, counted
    c, j = cands(("aaa", 3), ("b", 2))
    rows, report = reward_pairs(c, j, 0.0, LengthControl(1.0))
    assert rows == [] and report["dropped"] == {"inverted": 1}
    c, j = cands(("a", 3), ("bb", 2))
    assert pick(reward_pairs(c, j, 0.0, LengthControl(1.0))[0]) == ("a", "bb")
    assert mean_lengths(reward_pairs(*cands(("12345", 5), ("1", 1)), 0.0)[0]) == {
        "chosen": 5.0,
        "rejected": 1.0,
    }


# ---------------------------------------------------------------- the meta-judge


def test_meta_judge_labels_scores_and_outcomes() -> None:
    assert parse_meta_winner("A is better.\nWinner: Judgement B") == ("B", None)
    assert parse_meta_winner("winner: [judgment a]") == ("A", None)
    assert parse_meta_winner("Winner: Judgement A ... no wait. Winner: Judgement B")[0] == "B"  # the last
    assert parse_meta_winner("Judgement B is better")[0] is None
    assert strip_scores("Relevant and complete.\nScore: 4") == "Relevant and complete."
    v = {x: MetaVerdict(text="", winner=x) for x in ("A", "B")}
    fail = MetaVerdict(text="?", failure="unparseable: no label")
    assert outcome_of(v["A"], v["B"]) == "a"  # a won shown first and shown second
    assert outcome_of(v["B"], v["A"]) == "b"
    assert outcome_of(v["A"], v["A"]) == "tie"  # the first shown always wins: position bias
    assert outcome_of(v["A"], fail) == "failed"


def battle(a: int, b: int, outcome: str) -> Battle:
    empty = MetaVerdict(text="")
    return Battle(a=a, b=b, ab=empty, ba=empty, outcome=outcome)  # type: ignore[arg-type]


def test_elo_is_the_bradley_terry_fit_of_the_battles() -> None:
    # 0 beats 1 and 2, 1 beats 2: the order 0 > 1 > 2, symmetric around 1000
    scores = elo(3, [battle(0, 1, "a"), battle(0, 2, "a"), battle(1, 2, "a")])
    assert scores[0] > scores[1] > scores[2] and math.isclose(sum(scores) / 3, 1000, abs_tol=1e-3)
    assert math.isclose(scores[1], 1000, abs_tol=1e-3)
    # ties and failures: no order
    assert len(set(elo(2, [battle(0, 1, "tie")]))) == 1 and len(set(elo(2, [battle(0, 1, "failed")]))) == 1
    # two wins out of three: odds 2, 400 log10(2) ~ 120 points apart before the small L2 pull
    two_of_three = elo(2, [battle(0, 1, "a"), battle(0, 1, "a"), battle(0, 1, "b")])
    assert 100 < two_of_three[0] - two_of_three[1] < 121


def test_the_most_disputed_candidate_of_each_prompt_is_meta_judged() -> None:
    def rec(pid: str, i: int, scores: list[float | None]) -> JudgmentRecord:
        verdicts = [
            Verdict(text=f"v{k}", score=s, failure=None if s is not None else "unparseable: x")
            for k, s in enumerate(scores)
        ]
        return JudgmentRecord(
            id=candidate_id(pid, i), prompt_id=pid, index=i, judge="j", template_sha256="t", mode="sample",
            verdicts=verdicts, score=None,
        )  # fmt: skip

    picked = pick_candidates(
        [
            rec("p", 0, [3, 3, 3]),  # no variance
            rec("p", 1, [1, 5, 3]),  # variance 8/3
            rec("p", 2, [5, 1, 3]),  # the same variance, a later index
            rec("q", 0, [4, None, None]),  # one parsed score
            rec("r", 0, [2, 4, None]),
        ]
    )
    assert [r.id for r in picked] == ["p:1", "r:0"]


def meta_record(
    pid: str, scores: list[float], elos: list[float], texts: list[str] | None = None
) -> dict[str, Any]:
    texts = texts or [f"judgment {i} of {pid}" for i in range(len(scores))]
    return {
        "id": candidate_id(pid, 0),
        "prompt_id": pid,
        "judgments": [
            {"verdict": i, "text": t, "score": s} for i, (t, s) in enumerate(zip(texts, scores, strict=True))
        ],
        "elo": elos,
    }


def test_judge_pairs_filters_and_the_score_share_rule() -> None:
    records = [
        meta_record("a", [4, 2, 3], [1100, 900, 1000]),  # kept: chosen 4, rejected 2
        meta_record("b", [3, 3], [1050, 950]),  # same score
        meta_record("c", [5, 1], [1000, 1000]),  # equal Elo
        meta_record("d", [4, 1], [1200, 800], texts=["x" * 2000, "short"]),  # chosen judgment too long
    ] + [meta_record(f"e{i}", [4, 2], [1100, 900]) for i in range(6)]  # chosen score 4 again and again
    cands = {
        r["id"]: CandidateRecord(
            id=r["id"], prompt_id=r["prompt_id"], prompt=f"Q {r['prompt_id']}?", index=0, text="A.", model="m"
        )
        for r in records
    }
    pairs, report = judge_pairs(
        records,
        cands,
        lambda q, r: f"judge this: {q} / {r}",
        max_judgment_chars=1100,
        max_score_share=0.4,
        seed=1,
    )
    # score 4 is the chosen score of 7 kept pairs; counts start at 1 for each of the 6 scores: the
    # 1st is taken (1/6), 2nd (2/7), 3rd (3/8), 4th (4/9 >= 0.4: no, 4/9 = 0.44) -> 3 taken
    assert len(pairs) == 3 and report["dropped"] == {
        "equal_elo": 1, "judgment_too_long": 1, "same_score": 1, "score_share": 4,
    }  # fmt: skip
    p = pairs[0]
    assert p["kind"] == "judge" and p["prompt"][0]["content"].startswith("judge this: Q ")
    assert p["chosen_score"] == 4 and p["rejected_score"] == 2 and p["chosen_elo"] > p["rejected_elo"]
    assert p["chosen_id"].endswith("#v0") and p["rejected_id"].endswith("#v1")


def test_mixing_keeps_judge_pairs_to_their_fraction() -> None:
    actor = [{"prompt_id": f"a{i:02d}", "kind": "actor"} for i in range(18)]
    judge = [{"prompt_id": f"j{i:02d}", "kind": "judge"} for i in range(10)]
    mixed, left = mix(actor, judge, 0.1, seed=7)  # 0.1 / 0.9 * 18 = 2 judge pairs
    kinds = [p["kind"] for p in mixed]
    assert kinds.count("judge") == 2 and kinds.count("actor") == 18 and left == 8
    assert mixed == sorted(mixed, key=lambda p: (p["prompt_id"], p["kind"]))
    assert mix(actor, judge, 0.1, seed=7)[0] == mixed  # seeded: the same choice
    assert mix(actor, judge, 0.0, seed=7) == (actor, 10)
    assert [p["kind"] for p in mix(actor[:4], judge, 0.5, seed=7)[0]].count("judge") == 4  # at most half


# ---------------------------------------------------------------- spin


def _ift(n: int) -> list[Any]:
    from selfreward.schemas import IFTRecord

    return [
        IFTRecord(id=f"r{i:02d}", tree_id=f"t{i}", prompt=f"question {i}", response=f"answer {i}")
        for i in range(n)
    ]


def test_spin_samples_the_seed_split_without_repeats_until_it_is_exhausted() -> None:
    from selfreward.stages.prompts import sample_seed_prompts

    ift = _ift(10)
    first, exhausted = sample_seed_prompts(ift, set(), 4, run_seed=3, t=1)
    assert not exhausted and len({r.id for r in first}) == 4
    assert (
        first == sample_seed_prompts(list(reversed(ift)), set(), 4, run_seed=3, t=1)[0]
    )  # seeded, order-free
    assert first != sample_seed_prompts(ift, set(), 4, run_seed=4, t=1)[0]
    used = {r.provenance["ift_id"] for r in first}
    second, exhausted = sample_seed_prompts(ift, used, 4, run_seed=3, t=2)
    assert not exhausted and not used & {r.provenance["ift_id"] for r in second}
    used |= {r.provenance["ift_id"] for r in second}
    third, exhausted = sample_seed_prompts(ift, used, 4, run_seed=3, t=3)
    ids = [r.provenance["ift_id"] for r in third]
    assert exhausted and len(set(ids)) == 4
    assert set(ids[:2]) == {r.id for r in ift} - used  # the two left first, then a new pass
    assert all(
        r.source == "seed-ift" and r.prompt == f"question {int(r.provenance['ift_id'][1:])}" for r in third
    )


def test_spin_pairs_the_human_answer_over_the_models_and_drops_identical_ones() -> None:
    from selfreward.schemas import PromptRecord
    from selfreward.stages.pairs import human_pairs

    prompts = [
        PromptRecord(id=f"ift-r{i}", prompt=f"q{i}", source="seed-ift", provenance={"ift_id": f"r{i}"})
        for i in range(5)
    ]
    human = {"r0": "The human answer.", "r1": "Same  text\n", "r2": "human two", "r3": "  "}
    cands = [
        CandidateRecord(
            id=candidate_id("ift-r0", 0),
            prompt_id="ift-r0",
            prompt="q0",
            index=0,
            text="model zero",
            model="m1",
        ),
        CandidateRecord(
            id=candidate_id("ift-r1", 0),
            prompt_id="ift-r1",
            prompt="q1",
            index=0,
            text="Same text",
            model="m1",
        ),
        CandidateRecord(
            id=candidate_id("ift-r3", 0), prompt_id="ift-r3", prompt="q3", index=0, text="m three", model="m1"
        ),
        CandidateRecord(
            id=candidate_id("ift-r4", 0), prompt_id="ift-r4", prompt="q4", index=0, text="m four", model="m1"
        ),
    ]
    pairs, report = human_pairs(prompts, cands, human)
    assert [p["prompt_id"] for p in pairs] == ["ift-r0"]
    (p,) = pairs
    assert p["chosen"] == [{"role": "assistant", "content": "The human answer."}]
    assert p["rejected"] == [{"role": "assistant", "content": "model zero"}]
    assert (
        p["kind"] == "spin" and p["chosen_id"] == "human:r0" and p["rejected_id"] == candidate_id("ift-r0", 0)
    )
    assert report["dropped"] == {
        "empty_answer": 1,  # r3: the human answer is blank
        "identical_to_human": 1,  # r1: equal up to whitespace
        "missing_answer": 1,  # r2: M(t) wrote nothing for it
        "no_human_answer": 1,  # r4
    }
    assert with_kinds(pairs, report)["pairs_by_kind"] == {"spin": 1}


def test_compare_flags_runs_that_differ_beyond_the_method() -> None:
    from selfreward.reports.compare import RunSummary, config_differences

    def run(name: str, **over: Any) -> RunSummary:
        config = RunConfig(name=name, **over)
        return RunSummary(name, config.variant, config)

    spin = run("a", variant="spin", prompts={"source": "seed-ift"}, services={"policy_url": "http://x:1"})
    same = run("b", variant="self-reward", iterations=3, artifact_root="/elsewhere")
    assert config_differences([spin, same]) == []  # the method's fields, the deployment's, the count
    other = run("c", variant="self-reward", dpo={"beta": 0.5}, prompts={"num_prompts": 7})
    diffs = config_differences([spin, same, other])
    assert [d["field"] for d in diffs] == ["dpo.beta", "prompts.num_prompts"]
    assert diffs[0]["values"] == {"a": 0.1, "b": 0.1, "c": 0.5}


# ---------------------------------------------------------------- cream


def judged(prompt: str, scores: list[float | None], judge: str = "j") -> list[JudgmentRecord]:
    return [
        JudgmentRecord(
            id=candidate_id(prompt, i), prompt_id=prompt, index=i, judge=judge, template_sha256="t",
            mode="logprob", verdicts=[Verdict(text="", score=s)], score=s,
        )
        for i, s in enumerate(scores)
    ]  # fmt: skip


def test_cream_consistency_is_kendall_tau_b_per_prompt_mapped_to_0_1() -> None:
    from selfreward.methods.cream import consistency, prompt_consistency

    assert prompt_consistency([1, 2, 3], [1, 2, 3]) == 1.0  # the same ranking
    assert prompt_consistency([1, 2, 3], [3, 2, 1]) == 0.0  # reversed
    # tau-b with a tie: 5 concordant, 0 discordant, one pair tied in the reference;
    # tau_b = 5 / sqrt(6 * 5) = 0.9129
    assert prompt_consistency([1, 2, 3, 4], [1, 1, 3, 4]) == pytest.approx((5 / math.sqrt(30) + 1) / 2)
    assert prompt_consistency([2, 2, 2], [1, 2, 3]) == 0.5  # one judge gave one score: no ranking
    assert prompt_consistency([1], [1]) is None
    current = judged("a", [1, 2, 3]) + judged("b", [3, 2, 1]) + judged("c", [4, 4]) + judged("d", [5, None])
    reference = judged("a", [1, 2, 3]) + judged("b", [1, 2, 3]) + judged("c", [1, 5]) + judged("d", [5, 1])
    rates, report = consistency(current, reference)
    assert rates == {"a": 1.0, "b": 0.0, "c": 0.5, "d": None}  # d: one candidate scored by both
    assert report == {
        "mean": 0.5, "min": 0.0, "max": 1.0, "prompts": 3, "prompts_one_score": 1, "prompts_without": 1,
    }  # fmt: skip


def test_cream_config_rules() -> None:
    with pytest.raises(ValueError, match="cream.first_reference: 'teacher' needs teacher.backend"):
        RunConfig(variant="cream", cream={"first_reference": "teacher"})
    with pytest.raises(ValueError, match="cream's consistency-regularised loss is built on DPO's sigmoid"):
        RunConfig(variant="cream", dpo={"loss_type": "ipo"})
    with pytest.raises(ValueError, match="policy.max_loras: cream judges with M.t. and M.t-1. at once"):
        RunConfig(variant="cream", iterations=2, policy={"max_loras": 1})
    ok = RunConfig(variant="cream", iterations=2, policy={"max_loras": 2})
    assert ok.feedback_judge() == "policy:self" and "reference_judgments" in METHODS["cream"].stages


def test_cream_pairs_carry_the_prompt_consistency_and_the_mean_is_the_confidence(tmp_path: Path) -> None:
    from selfreward.config import build_config
    from selfreward.methods.cream import build_pairs
    from selfreward.stages.stage import StageContext
    from selfreward.storage import RunLayout, write_jsonl_atomic

    config = build_config({"name": "c", "artifact_root": str(tmp_path), "variant": "cream"}, environ={})
    ctx = StageContext(config, RunLayout(tmp_path, "c"), 1)
    c1, _ = cands(("a", 0), ("bb", 0), ("ccc", 0))
    c2 = [c.model_copy(update={"prompt_id": "q", "id": candidate_id("q", c.index)}) for c in c1]
    write_jsonl_atomic(ctx.file("candidates"), [c.model_dump() for c in c1 + c2])
    write_jsonl_atomic(
        ctx.file("judgments"), [j.model_dump() for j in judged("p", [1, 5, 3]) + judged("q", [2, 4, 3])]
    )
    ref = judged("p", [1, 5, 3], "policy:m1") + judged("q", [4, 2, 3], "policy:m1")
    write_jsonl_atomic(ctx.file("reference_judgments"), [j.model_dump() for j in ref])
    pairs, report = build_pairs(ctx)
    assert [(p["prompt_id"], p["chosen_id"], p["rejected_id"], p["consistency"]) for p in pairs] == [
        ("p", "p:1", "p:0", 1.0),
        ("q", "q:1", "q:0", 0.0),
    ]
    assert {p["kind"] for p in pairs} == {"cream"}
    assert report["consistency"]["mean"] == 0.5 and report["preference_confidence"] == 0.5
    assert report["consistency"]["reference_judge"] == "policy:m1"


def test_every_shipped_config_loads_and_the_method_configs_compare_with_the_quickstart() -> None:
    from selfreward.config import load_config
    from selfreward.reports.compare import RunSummary, config_differences

    root = Path(__file__).parent.parent / "configs"
    loaded = {p.stem: load_config(p, environ={}) for p in sorted(root.glob("*.yaml"))}
    assert {"quickstart", "spin", "cream", "temporal"} <= set(loaded)
    quick = loaded["quickstart"]
    for name in ("spin", "cream", "temporal"):
        c = loaded[name]
        assert c.variant == name
        runs = [RunSummary("quickstart", quick.variant, quick), RunSummary(name, c.variant, c)]
        assert config_differences(runs) == [], name


# ---------------------------------------------------------------- temporal


def answers(prompt: str, scores: list[float | None], *, anchor: bool = False, start: int = 0):
    c, j = [], []
    for k, score in enumerate(scores):
        i = start + k
        cid = candidate_id(prompt, i)
        c.append(
            CandidateRecord(
                id=cid,
                prompt_id=prompt,
                prompt=f"{prompt}?",
                index=i,
                text=f"{prompt}-{i}",
                model="m",
                anchor=anchor,
            )
        )
        j.append(JudgmentRecord(
            id=cid, prompt_id=prompt, index=i, judge="j", template_sha256="t", mode="logprob",
            verdicts=[Verdict(text="", score=score)], score=score,
        ))  # fmt: skip
    return c, j


def test_temporal_anchored_rejection_takes_the_anchors_worst_only_when_it_is_lower() -> None:
    from selfreward.methods.temporal import anchored_pairs

    parts = [
        answers("a", [3, 4]), answers("a", [1, 5], anchor=True, start=2),  # anchor 1 < M(t)'s worst 3
        answers("b", [2, 4]), answers("b", [3, 5], anchor=True, start=2),  # anchor not lower: M(t)'s 2
        answers("c", [4]), answers("c", [4], anchor=True, start=1),  # one answer, anchor not lower
        answers("d", [None, None]), answers("d", [1], anchor=True, start=2),  # M(t) scored nothing
        answers("e", [3, 3]), answers("e", [3], anchor=True, start=2),  # tie
        answers("f", [4]), answers("f", [0], anchor=True, start=1),  # one answer, the anchor lower
    ]  # fmt: skip
    cands = [c for part in parts for c in part[0]]
    judged = [j for part in parts for j in part[1]]
    pairs, report = anchored_pairs(cands, judged, 0.0)
    got = [(p["prompt_id"], p["chosen_id"], p["rejected_id"], p["kind"]) for p in pairs]
    assert got == [
        ("a", "a:1", "a:2", "current/anchor"),
        ("b", "b:1", "b:0", "current/current"),
        ("f", "f:0", "f:1", "current/anchor"),
    ]
    assert report["dropped"] == {"fewer_than_two_scored": 1, "no_scored_answer": 1, "tie": 1}
    assert (report["rejected_from_anchor"], report["rejected_from_current"]) == (2, 1)
    assert report["anchor_answers"] == 8 and report["candidates"] == 10


def test_temporal_future_guided_chosen_replaces_only_a_strictly_better_answer() -> None:
    from selfreward.methods.temporal import anchored_pairs, future_guided_pairs

    c, j = answers("a", [3, 4])
    ca, ja = answers("a", [1], anchor=True, start=2)
    c2, j2 = answers("b", [2, 4])
    anchored, _ = anchored_pairs(c + ca + c2, j + ja + j2, 0.0)
    fa, fja = answers("a", [5, 4.5])  # M_f beats M(t)'s best 4 on a
    fb, fjb = answers("b", [4, 1])  # M_f only equals it on b: keep M(t)'s
    future = [x.model_copy(update={"text": "future " + x.text}) for x in fa + fb]
    pairs, report = future_guided_pairs(anchored, future, fja + fjb)
    assert [(p["prompt_id"], p["chosen_id"], p["chosen_score"], p["kind"]) for p in pairs] == [
        ("a", "future:a:0", 5, "future/anchor"),
        ("b", "b:1", 4, "current/current"),
    ]
    assert pairs[0]["chosen"][0]["content"] == "future a-0" and pairs[0]["rejected_id"] == "a:2"
    assert report["chosen_from_future"] == 1 and report["mean_future_gain"] == 1.0
    assert with_kinds(pairs, report)["pairs_by_kind"] == {"current/current": 1, "future/anchor": 1}


def test_temporal_config_rules_and_stages() -> None:
    from selfreward.methods.temporal import future_model
    from selfreward.stages.plan import stages_of

    with pytest.raises(ValueError, match="temporal serves M.t., the anchor and the future model M_f at once"):
        RunConfig(variant="temporal", policy={"max_loras": 2})
    config = RunConfig(variant="temporal", temporal={"anchor": "m0"})
    assert METHODS["temporal"].anchor_model(config) == 0
    assert METHODS["temporal"].anchor_model(RunConfig(variant="temporal")) == 1
    assert [s.name for s in stages_of(1, "temporal")][3:8] == [
        "anchored_pairs", "future_train", "future_candidates", "future_judgments", "pairs",
    ]  # fmt: skip
    assert future_model(1) == "m2-future"
