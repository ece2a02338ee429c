"""Head-to-head, AlpacaEval-style and reward-model evaluations through the real judge library,
with Gemini replaced by the local server speaking its wire format (selfreward.testing.fake_gemini).

The fake Gemini is a deterministic judge: in a pairwise prompt it prefers the longer output (so
both orders agree unless the lengths are equal), and in a scoring prompt it gives the digit
written in the response as "quality N" (no digit: an unparseable verdict).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from selfreward.cli.main import app
from selfreward.config import JudgeConfig, TeacherConfig
from selfreward.evaluation.alpaca_eval import alpaca_report, reference_prompts, run_alpaca
from selfreward.evaluation.answers import AnswerSide, resolve_side
from selfreward.evaluation.head2head import head2head_report, run_head2head
from selfreward.evaluation.metrics.alpaca import read_outputs
from selfreward.evaluation.prompt_sets import load_prompt_set
from selfreward.evaluation.reward_model import reward_model_eval, score_eft
from selfreward.judging import make_judge
from selfreward.schemas import EFTEvalRecord, read_records
from selfreward.storage import load_jsonl
from selfreward.testing.fake_gemini import FakeGemini, fake_gemini

KEY = "eval-test-key"
OUTPUT = re.compile(r'"output": """(.*?)"""', re.S)
RESPONSE = re.compile(r"<response>(.*?)</response>", re.S)


def fake_judge_reply(model: str, prompt: str, body: dict[str, Any]) -> str:
    outputs = OUTPUT.findall(prompt)
    if len(outputs) == 2:
        return "M" if len(outputs[1]) > len(outputs[0]) else "m"
    response = RESPONSE.search(prompt)
    digit = re.search(r"quality (\d)", response.group(1) if response else "")
    return f"Because.\nScore: {digit.group(1)}" if digit else "I cannot tell."


@pytest.fixture(scope="module")
def gemini_server() -> Iterator[FakeGemini]:
    with fake_gemini(api_key=KEY, reply=fake_judge_reply) as fake:
        yield fake


@pytest.fixture()
def fake(gemini_server: FakeGemini, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGemini]:
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    gemini_server.reset()
    yield gemini_server
    gemini_server.reset()


def judge_for(fake: FakeGemini, **cfg: Any):
    config = JudgeConfig(**{"samples": 1, "max_retries": 0, "initial_backoff_s": 0.01, **cfg})
    return make_judge("gemini:gemini-test", config, teacher=TeacherConfig(gemini_base_url=fake.base_url))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture()
def two_models(tmp_path: Path) -> tuple[Path, Path, Path]:
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"id": f"p{i}", "instruction": f"task {i}"} for i in range(5)]
    )
    a = ["long answer one", "long answer two", "short", "same answer", "long answer four"]
    b = ["short", "short", "a much longer answer", "same answer", "tiny"]
    fa = write_jsonl(
        tmp_path / "m2.jsonl", [{"instruction": f"task {i}", "output": o} for i, o in enumerate(a)]
    )
    fb = write_jsonl(
        tmp_path / "m1.jsonl", [{"instruction": f"task {i}", "output": o} for i, o in enumerate(b)]
    )
    return prompts, fa, fb


async def _h2h(fake: FakeGemini, prompts: Path, a: Path, b: Path, work: Path) -> dict[str, Any]:
    judge = judge_for(fake)
    try:
        return await run_head2head(
            resolve_side(str(a)),
            resolve_side(str(b)),
            load_prompt_set(str(prompts)),
            judge=judge,
            judge_name=judge.name,
            client=None,
            work_dir=work,
            bootstrap_samples=200,
            seed=1,
            prompts_spec=str(prompts),
        )
    finally:
        await judge.aclose()


def test_head2head_from_files_is_judged_in_both_orders_and_resumes(
    fake: FakeGemini, two_models, tmp_path: Path
) -> None:
    prompts, fa, fb = two_models
    work = tmp_path / "h2h"
    data = asyncio.run(_h2h(fake, prompts, fa, fb, work))
    # longer wins: A wins p0, p1, p4; B wins p2; p3 identical = tie without a judge call
    assert (data["wins"], data["ties"], data["losses"], data["failures"]) == (3, 1, 1, 0)
    assert data["win_rate"] == pytest.approx(3.5 / 5) and data["identical_answers"] == 1
    assert fake.calls == 2 * 4  # two orders for each of the 4 different pairs
    orders = [r.body["contents"][0]["parts"][0]["text"] for r in fake.requests]
    assert sum("long answer one" in t.split('"output"')[1] for t in orders) == 1  # A shown first once...
    assert sum("long answer one" in t.split('"output"')[2] for t in orders) == 1  # ...and second once
    verdicts = load_jsonl(work / "verdicts-m2-vs-m1.jsonl")
    assert len(verdicts) == 5 and {v["judge"] for v in verdicts} == {"gemini:gemini-test"}
    assert next(v for v in verdicts if v["prompt_id"] == "p0")["ab"]["winner"] == "A"

    # a re-run judges nothing again (a new judge: no in-process cache), same numbers
    fake.reset()
    again = asyncio.run(_h2h(fake, prompts, fa, fb, work))
    assert fake.calls == 0 and again["win_rate"] == data["win_rate"]

    # a changed answer is judged again, alone
    rows = load_jsonl(fb)
    rows[0]["output"] = "now B writes the longest answer of all"
    write_jsonl(fb, rows)
    fake.reset()
    changed = asyncio.run(_h2h(fake, prompts, fa, fb, work))
    assert fake.calls == 2 and (changed["wins"], changed["losses"]) == (2, 2)

    paths = head2head_report(work, changed)
    assert paths["win_tie_loss.png"].read_bytes()[:4] == b"\x89PNG"
    md = paths["markdown"].read_text()
    assert "| win | 40.0% |" in md and "judged by `gemini:gemini-test` in both orders" in md


def test_head2head_transient_failures_are_excluded_and_retried(
    fake: FakeGemini, two_models, tmp_path: Path
) -> None:
    prompts, fa, fb = two_models
    fake.fail_next(503, times=1)
    data = asyncio.run(_h2h(fake, prompts, fa, fb, tmp_path / "w"))
    assert data["failures"] == 1 and data["n"] == 4
    assert len(load_jsonl(tmp_path / "w" / "verdicts-m2-vs-m1.jsonl")) == 4  # the failed pair is not stored
    fake.reset()
    data = asyncio.run(_h2h(fake, prompts, fa, fb, tmp_path / "w"))
    assert data["failures"] == 0 and data["n"] == 5 and fake.calls == 2


def test_head2head_command_line(fake: FakeGemini, two_models, tmp_path: Path) -> None:
    prompts, fa, fb = two_models
    config = tmp_path / "run.yaml"
    config.write_text(
        f"teacher:\n  gemini_base_url: {fake.base_url}\njudge:\n  samples: 1\n  max_retries: 0\n"
    )
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "head2head",
            "--a",
            str(fa),
            "--b",
            str(fb),
            "--judge",
            "gemini:gemini-test",
            "--prompts",
            str(prompts),
            "--out-dir",
            str(out),
            "--config",
            str(config),
            "--bootstrap",
            "200",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    assert (data["a"], data["b"], data["wins"], data["ties"], data["losses"]) == ("m2", "m1", 3, 1, 1)
    assert data["plots"] == ["win_tie_loss.png"] and "win rate" in result.output
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "head2head",
            "--a",
            str(tmp_path / "nope.jsonl"),
            "--b",
            str(fb),
            "--judge",
            "gemini:x",
            "--prompts",
            str(prompts),
            "--config",
            str(config),
        ],
    )
    assert result.exit_code == 2 and "nope.jsonl: answers file not found" in result.output


# ------------------------------------------------------------------ AlpacaEval


def test_alpaca_win_rate_with_identical_outputs_and_export(fake: FakeGemini, tmp_path: Path) -> None:
    reference = tmp_path / "ref.json"
    reference.write_text(
        json.dumps(
            [
                {"instruction": f"q{i}", "output": o, "generator": "gpt4", "dataset": "d"}
                for i, o in enumerate(["mid size", "mid size", "same", "mid size", "left out"])
            ]
        )
    )
    model = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"instruction": "q0", "output": "a longer answer"},
            {"instruction": "q1", "output": "tiny"},
            {"instruction": "q2", "output": "same"},
            {"instruction": "q3", "output": "a longer answer"},
            {"instruction": "q9", "output": "not in the reference"},
        ],
    )

    async def go() -> dict[str, Any]:
        judge = judge_for(fake)
        try:
            return await run_alpaca(
                AnswerSide("mine", model),
                reference_prompts(read_outputs(reference), None, 0),
                work_dir=tmp_path / "out",
                client=None,
                reference_path=reference,
                judge=judge,
                judge_name=judge.name,
                bootstrap_samples=200,
            )
        finally:
            await judge.aclose()

    data = asyncio.run(go())
    wr = data["win_rate"]
    assert wr["win_rate"] == pytest.approx((1 + 0 + 0.5 + 1) / 4) and wr["n_identical"] == 1
    assert (wr["n_wins"], wr["n_draws"], wr["n_losses"]) == (2, 1, 1)
    assert data["only_in_reference"] == 1 and data["instructions"] == 4
    assert fake.calls == 2 * 3
    assert "our implementation" in data["length_controlled"]["label"]
    exported = json.loads((tmp_path / "out" / "model_outputs.json").read_text())
    assert exported[0] == {
        "instruction": "q0",
        "output": "a longer answer",
        "generator": "mine",
        "dataset": "d",
    }
    paths = alpaca_report(tmp_path / "out", data)
    assert "our implementation of Dubois et al. 2024" in paths["markdown"].read_text()


def test_alpaca_command_exports_without_a_judge(tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "q0"}, {"instruction": "q1"}])
    model = write_jsonl(
        tmp_path / "m.jsonl", [{"instruction": "q1", "output": "x"}, {"instruction": "q0", "output": "y"}]
    )
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "alpaca",
            "--model",
            str(model),
            "--prompts",
            str(prompts),
            "--generator",
            "m9",
            "--out-dir",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 0, result.output
    exported = json.loads((tmp_path / "o" / "model_outputs.json").read_text())
    assert [(e["instruction"], e["generator"], e["dataset"]) for e in exported] == [
        ("q1", "m9", "p"),
        ("q0", "m9", "p"),
    ]
    assert "alpaca_eval --model_outputs" in result.output


@pytest.mark.shared_data
def test_alpaca_real_phi2_against_gpt4_reference(fake: FakeGemini, shared_data: Path, tmp_path: Path) -> None:
    """With a judge that prefers the longer output, the win rate is the share of longer phi-2 answers."""
    ref_path = shared_data / "alpaca_eval" / "gpt4_1106_preview.json"
    phi2_path = shared_data / "alpaca_eval" / "phi-2.json"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"teacher:\n  gemini_base_url: {fake.base_url}\njudge:\n  samples: 1\n  max_response_chars: 100000\n"
    )
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "alpaca",
            "--model",
            str(phi2_path),
            "--reference",
            str(ref_path),
            "--judge",
            "gemini:g",
            "--max-prompts",
            "24",
            "--out-dir",
            str(tmp_path / "o"),
            "--config",
            str(config),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "o" / "report.json").read_text())
    ref = {o.instruction: o.output for o in read_outputs(ref_path)}
    phi2 = {o.instruction: o.output for o in read_outputs(phi2_path)}
    chosen = [e["instruction"] for e in json.loads((tmp_path / "o" / "model_outputs.json").read_text())]
    assert all(e in ref for e in chosen) and data["instructions"] == len(chosen) <= 24
    expected = [
        1.0 if len(phi2[i]) > len(ref[i]) else 0.0 if len(phi2[i]) < len(ref[i]) else 0.5 for i in chosen
    ]
    assert data["win_rate"]["win_rate"] == pytest.approx(sum(expected) / len(expected))
    assert data["reference_generator"] == "gpt4_1106_preview" and data["generator"] == "phi-2"


# ------------------------------------------------------------------ reward model


def test_score_eft_then_human_rank_metrics(fake: FakeGemini, tmp_path: Path) -> None:
    eft = write_jsonl(
        tmp_path / "eft_eval.jsonl",
        [
            {
                "id": "e1",
                "tree_id": "t1",
                "prompt": "q1",
                "replies": [
                    {"message_id": "a", "text": "quality 5", "rank": 0},
                    {"message_id": "b", "text": "quality 2", "rank": 1},
                    {"message_id": "c", "text": "no digit here", "rank": 2},
                ],
            },
            {
                "id": "e2",
                "tree_id": "t2",
                "prompt": "q2",
                "replies": [
                    {"message_id": "d", "text": "quality 3", "rank": 1},
                    {"message_id": "e", "text": "quality 4", "rank": 0},
                ],
            },
        ],
    )
    records = read_records(eft, EFTEvalRecord)
    out = tmp_path / "scores.jsonl"

    async def go() -> None:
        judge = judge_for(fake)
        try:
            await score_eft(judge, records, judge_name=judge.name, out_path=out)
        finally:
            await judge.aclose()

    asyncio.run(go())
    rows = {r["prompt_id"]: r for r in load_jsonl(out)}
    assert [c["score"] for c in rows["e1"]["completion"].values()] == [5.0, 2.0, -1]
    assert rows["e1"]["completion"]["2"]["failures"] == 1 and rows["e2"]["judge"] == "gemini:gemini-test"
    data = reward_model_eval(out, human_path=eft).to_json()
    # e1: (5,2) agree, (5,-1) agree, (2,-1) agree; e2: 4 > 3 agrees
    assert data["pairwise_accuracy"] == 1.0 and data["exact_match"] == 1.0 and data["five_best"] == 1.0
    assert data["parse_failure_rate"] == pytest.approx(1 / 5)
    assert data["excluding_unparseable"]["pairs"] == 2

    calls = fake.calls
    asyncio.run(go())  # resumable: nothing scored again
    assert fake.calls == calls


def test_score_eft_command_line(fake: FakeGemini, tmp_path: Path) -> None:
    eft = write_jsonl(
        tmp_path / "eft_eval.jsonl",
        [
            {
                "id": f"e{i}",
                "tree_id": "t",
                "prompt": "q",
                "replies": [
                    {"message_id": f"{i}a", "text": "quality 4", "rank": 0},
                    {"message_id": f"{i}b", "text": "quality 1", "rank": 1},
                ],
            }
            for i in range(3)
        ],
    )
    config = tmp_path / "run.yaml"
    config.write_text(f"teacher:\n  gemini_base_url: {fake.base_url}\njudge:\n  samples: 2\n")
    out = tmp_path / "s.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "score-eft",
            "--judge",
            "gemini:g",
            "--eft",
            str(eft),
            "--out",
            str(out),
            "--config",
            str(config),
            "--max-prompts",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(load_jsonl(out)) == 2 and fake.calls == 2 * 2 * 2  # 2 records x 2 replies x K=2
    result = CliRunner().invoke(app, ["eval", "reward-model", "--scores", str(out), "--human", str(eft)])
    assert result.exit_code == 0 and "pairwise accuracy" in result.output


def test_alpaca_command_with_instruction_difficulty(fake: FakeGemini, tmp_path: Path) -> None:
    outputs = ["short", "a longer one", "mid", "the longest answer here", "x"]
    reference = tmp_path / "ref.json"
    reference.write_text(
        json.dumps([{"instruction": f"q{i}", "output": "ref out", "generator": "gpt4"} for i in range(5)])
    )
    model = write_jsonl(
        tmp_path / "m.jsonl", [{"instruction": f"q{i}", "output": o} for i, o in enumerate(outputs)]
    )
    config = tmp_path / "run.yaml"
    config.write_text(f"teacher:\n  gemini_base_url: {fake.base_url}\njudge:\n  samples: 1\n")
    csv = tmp_path / "instruction_difficulty.csv"
    csv.write_text(
        ",instruction_difficulty\n" + "".join(f"{i},{d}\n" for i, d in enumerate([0.1, -0.4, 0.3, 1.2, -1.0]))
    )
    args = [
        "eval",
        "alpaca",
        "--model",
        str(model),
        "--reference",
        str(reference),
        "--judge",
        "gemini:g",
        "--config",
        str(config),
        "--out-dir",
        str(tmp_path / "o"),
        "--difficulty",
        str(csv),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "o" / "report.json").read_text())
    assert data["win_rate"]["win_rate"] == pytest.approx(2 / 5)  # longer than "ref out" (7 chars): 2 of 5
    lc = data["length_controlled"]
    assert lc["uses_difficulty"] and set(lc["coefficients"]) == {"theta", "phi", "psi"}
    csv.write_text(",instruction_difficulty\n0,0.1\n1,0.2\n")
    result = CliRunner().invoke(
        app, [*args[:-4], "--out-dir", str(tmp_path / "o2"), "--difficulty", str(csv)]
    )
    assert result.exit_code == 2 and "difficulties lack 3 of the 5 judged instructions" in result.output


def test_both_served_sides_answer_at_once_within_the_answer_concurrency(
    fake: FakeGemini, tmp_path: Path
) -> None:
    """Generated answers of both sides share one batch: `answer_concurrency` requests in flight for
    the two together (the client's own limit is smaller), both models at once; a re-run asks nothing."""
    from selfreward.llm.openai import OpenAICompatClient
    from selfreward.testing.fake_vllm import fake_vllm

    prompts = load_prompt_set(
        str(
            write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "instruction": f"task {i}"} for i in range(6)])
        )
    )

    async def go(server_url: str, answer_concurrency: int | None, work: Path) -> dict[str, Any]:
        judge = judge_for(fake)
        client = OpenAICompatClient(server_url, concurrency=2, pool_size=8)
        try:
            return await run_head2head(
                AnswerSide("m2"),
                AnswerSide("m1"),
                prompts,
                judge=judge,
                judge_name=judge.name,
                client=client,
                work_dir=work,
                bootstrap_samples=100,
                answer_concurrency=answer_concurrency,
            )
        finally:
            await judge.aclose()
            await client.aclose()

    with fake_vllm() as server:
        server.adapters.update(m1="/adapters/m1", m2="/adapters/m2")
        server.chat_delay_s = 0.2
        data = asyncio.run(go(server.url, 8, tmp_path / "wide"))
        assert data["prompt_count"] == 6 and data["sources"] == {"m2": "generated", "m1": "generated"}
        assert sorted(server.chats) == ["m1"] * 6 + ["m2"] * 6
        assert server.peak_in_flight == 8 and server.peak_models_in_flight == 2
        answers = load_jsonl(tmp_path / "wide" / "answers-m2.jsonl")
        assert sorted(a["output"] for a in answers) == [f"m2: task {i}" for i in range(6)]

        server.chats.clear()
        again = asyncio.run(go(server.url, 8, tmp_path / "wide"))  # resumed: nothing generated again
        assert server.chats == [] and again["win_rate"] == data["win_rate"]

        server.peak_in_flight = 0
        asyncio.run(go(server.url, None, tmp_path / "narrow"))  # no answer_concurrency: the client's 2
        assert len(server.chats) == 12 and server.peak_in_flight == 2
