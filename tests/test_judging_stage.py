"""The judgment stage and `selfreward judge`: judgments.jsonl, resumable, failures kept, errors named."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from selfreward.cli.main import app
from selfreward.config import JudgeConfig, TeacherConfig
from selfreward.errors import InputError, StageError
from selfreward.judging import judge_candidates, make_judge, read_judge_inputs
from selfreward.progress import Progress, ProgressEvent
from selfreward.schemas import CandidateRecord, JudgmentRecord, candidate_id
from selfreward.storage import load_jsonl, write_jsonl_atomic
from selfreward.testing.fake_gemini import FakeGemini, fake_gemini


@pytest.fixture(scope="module")
def gemini_server() -> Iterator[FakeGemini]:
    with fake_gemini(api_key="k") as fake:
        yield fake


@pytest.fixture()
def fake(gemini_server: FakeGemini, monkeypatch: pytest.MonkeyPatch) -> FakeGemini:
    monkeypatch.setenv("GEMINI_API_KEY", "k")
    monkeypatch.setenv("SELFREWARD_TEACHER__GEMINI_BASE_URL", gemini_server.base_url)
    gemini_server.reset()
    gemini_server.reply = lambda m, p, b: "No score here." if "answer 3" in p else "Clear.\nScore: 4"
    return gemini_server


def write_candidates(path: Path, prompts: int = 3, per_prompt: int = 2) -> list[CandidateRecord]:
    records = [
        CandidateRecord(
            id=candidate_id(f"p{p}", i),
            prompt_id=f"p{p}",
            prompt=f"Question {p}?",
            index=i,
            text=f"answer {p * per_prompt + i}",
            model="m1",
        )
        for p in range(prompts)
        for i in range(per_prompt)
    ]
    write_jsonl_atomic(path, [r.model_dump() for r in records])
    return records


def judge_of(fake: FakeGemini, **cfg: Any):
    config = JudgeConfig(**{"samples": 2, "initial_backoff_s": 0.01, **cfg})
    return make_judge("gemini:g", config, teacher=TeacherConfig(gemini_base_url=fake.base_url))


def test_stage_writes_one_judgment_per_candidate_and_resumes(fake: FakeGemini, tmp_path: Path) -> None:
    cands = tmp_path / "candidates.jsonl"
    out = tmp_path / "judgments.jsonl"
    write_candidates(cands)
    events: list[ProgressEvent] = []
    counts = judge_candidates(cands, out, judge_of(fake), Progress(events.append))
    assert counts["candidates"] == counts["judged"] == 6 and counts["already_judged"] == 0
    assert counts["verdicts"] == 12 and counts["parse_failures"] == 2 and counts["unscored"] == 1
    assert counts["failure_kinds"] == {"no_score": 2}
    assert events[-1].finished and events[-1].done == 6
    rows = [JudgmentRecord.model_validate(r) for r in load_jsonl(out)]
    assert sorted(r.id for r in rows) == sorted(candidate_id(f"p{p}", i) for p in range(3) for i in range(2))
    by_id = {r.id: r for r in rows}
    assert by_id["p1:1"].score is None and by_id["p1:1"].failures == 2  # failures kept with their text
    assert by_id["p1:1"].verdicts[0].text == "No score here."
    assert by_id["p0:0"].score == 4.0 and by_id["p0:0"].prompt_id == "p0" and by_id["p0:0"].index == 0
    assert by_id["p0:0"].judge == "gemini:g" and by_id["p0:0"].mode == "sample"
    calls = fake.calls
    again = judge_candidates(cands, out, judge_of(fake, cache=False))
    assert again["already_judged"] == 6 and again["judged"] == 0 and fake.calls == calls


def test_backend_errors_are_not_written_and_a_rerun_finishes(fake: FakeGemini, tmp_path: Path) -> None:
    cands = tmp_path / "candidates.jsonl"
    out = tmp_path / "judgments.jsonl"
    write_candidates(cands, prompts=2, per_prompt=2)
    fake.fail_next(503, times=2)  # max_retries=0: the first two model calls fail for good
    with pytest.raises(StageError, match=r"2 candidate\(s\) got no verdict.*run again"):
        judge_candidates(cands, out, judge_of(fake, samples=1, max_retries=0, concurrency=1))
    assert len(load_jsonl(out)) == 2
    # a crash mid-write leaves a torn line: it is cut on reopening
    with open(out, "a", encoding="utf-8") as fh:
        fh.write('{"id": "p1:0", "prom')
    counts = judge_candidates(cands, out, judge_of(fake, samples=1, max_retries=0))
    assert counts["already_judged"] == 2 and counts["judged"] == 2
    assert sorted(r["id"] for r in load_jsonl(out)) == ["p0:0", "p0:1", "p1:0", "p1:1"]


def test_a_file_of_another_judge_is_refused(fake: FakeGemini, tmp_path: Path) -> None:
    cands = tmp_path / "candidates.jsonl"
    out = tmp_path / "judgments.jsonl"
    write_candidates(cands, prompts=1)
    judge_candidates(cands, out, judge_of(fake))
    with pytest.raises(InputError, match="was judged by gemini:g .* mode sample.* mode logprob"):
        judge_candidates(cands, out, judge_of(fake, mode="logprob"))


def test_plain_rows_and_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"instruction": "Q1", "response": "A"},
                {"prompt": "Q1", "text": "B"},
                {"instruction": "Q1", "response": "A"},  # the same pair twice: one judgment
                {"id": "x", "instruction": "Q2", "response": "C", "index": 4},
            ]
        )
        + "\n"
    )
    inputs = read_judge_inputs(path)
    assert [(x.instruction, x.response, x.index) for x in inputs] == [
        ("Q1", "A", 0),
        ("Q1", "B", 1),
        ("Q2", "C", 4),
    ]
    assert (
        inputs[0].id.startswith("sha-") and inputs[0].prompt_id == inputs[1].prompt_id and inputs[2].id == "x"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Q", "response": "A"}\n{"instruction": "Q"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: missing field 'response' or 'text'"):
        read_judge_inputs(bad)
    bad.write_text('{"instruction": "Q", "response": 3}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:1: field 'response' must be a string"):
        read_judge_inputs(bad)
    bad.write_text(
        '{"id": 1, "instruction": "Q", "response": "a"}\n{"id": 1, "instruction": "Q", "response": "b"}\n'
    )
    with pytest.raises(InputError, match="duplicate id '1'"):
        read_judge_inputs(bad)


def test_cli_score_and_compare(fake: FakeGemini, tmp_path: Path) -> None:
    runner = CliRunner()
    cands = tmp_path / "candidates.jsonl"
    out = tmp_path / "judgments.jsonl"
    write_candidates(cands, prompts=2, per_prompt=2)
    args = ["judge", "score", str(cands), "--judge", "gemini:g", "--out", str(out), "--samples", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = load_jsonl(out)
    assert len(rows) == 4 and all(len(r["verdicts"]) == 3 for r in rows)
    assert "judged" in result.output
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and len(load_jsonl(out)) == 4
    # bad options and inputs: one line, exit status 2
    result = runner.invoke(app, ["judge", "score", str(cands), "--judge", "gemini:g", "--mode", "greedy"])
    assert result.exit_code == 2 and "judge.mode" in result.output
    result = runner.invoke(app, ["judge", "score", str(tmp_path / "nope.jsonl"), "--judge", "gemini:g"])
    assert result.exit_code == 2 and "file not found" in result.output

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps({"id": "q1", "instruction": "Hi?", "response_a": "good: hi", "response_b": "bad"}) + "\n"
    )
    fake.reply = lambda m, p, b: "m" if p.split('"output": """', 1)[1].startswith("good") else "M"
    comp = tmp_path / "comparisons.jsonl"
    result = runner.invoke(app, ["judge", "compare", str(pairs), "--judge", "gemini:g", "--out", str(comp)])
    assert result.exit_code == 0, result.output
    [row] = load_jsonl(comp)
    assert (
        row["id"] == "q1" and row["preference"] == 1.0 and row["ab"]["winner"] == row["ba"]["winner"] == "A"
    )


def test_shards_split_by_prompt_resume_and_merge_each_record_once_in_candidates_order(
    fake: FakeGemini, tmp_path: Path
) -> None:
    """Three shards of 12 prompts x 2 candidates: each shard judges only its prompts into its
    own file, a shard run again judges nothing twice, the merge keeps the candidates' order and
    each record once, and removes the shard files."""
    import asyncio

    from selfreward.judging.files import ajudge_candidates
    from selfreward.shards import Sharding, assign, merge, shard_path

    cands = tmp_path / "candidates.jsonl"
    records = write_candidates(cands, prompts=12)
    out = tmp_path / "judgments.jsonl"
    judge = judge_of(fake, samples=1)

    async def shard(i: int) -> dict[str, Any]:
        try:
            return await ajudge_candidates(cands, out, judge, sharding=Sharding(n=3, i=i))
        finally:
            await judge.aclose()  # each shard in an event loop of its own, as each shard job

    split = assign((x.prompt_id for x in read_judge_inputs(cands)), 3)
    assert split == {f"p{p}": p % 3 for p in range(12)}  # prompts in file order, round robin
    sizes = {i: sum(1 for r in records if split[r.prompt_id] == i) for i in range(3)}
    assert sizes == {0: 8, 1: 8, 2: 8}
    first = asyncio.run(shard(0))
    assert first["judged"] == sizes[0] and not out.exists()
    part = load_jsonl(shard_path(out, 0, 3))
    assert {split[r["prompt_id"]] for r in part} == {0}
    requests = len(fake.requests)
    assert asyncio.run(shard(0))["judged"] == 0 and len(fake.requests) == requests  # resumed: nothing twice
    for i in (1, 2):
        asyncio.run(shard(i))
    order = [r.id for r in records]
    assert merge(out, 3, order, lambda r: str(r["id"])) == 24
    merged = load_jsonl(out)
    assert [r["id"] for r in merged] == [r.id for r in records]
    assert not any(shard_path(out, i, 3).exists() for i in range(3))
    assert merge(out, 3, order, lambda r: str(r["id"])) == 0 and len(load_jsonl(out)) == 24  # idempotent
