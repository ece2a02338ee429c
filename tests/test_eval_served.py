"""The evaluate stage and `selfreward eval head2head` against a real vLLM policy server (tiny
model + a LoRA adapter as two models), the pairwise judge being the wire-format Gemini stand-in
and the reward-model judge the served adapter itself (logprob mode over vLLM)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from selfreward.cli.main import app
from selfreward.config import JudgeConfig, RunConfig, TeacherConfig
from selfreward.evaluation.iteration import evaluate_iteration
from selfreward.evaluation.prompt_sets import load_prompt_set
from selfreward.judging import make_judge
from selfreward.llm.openai import OpenAICompatClient
from selfreward.shards import Sharding, assign, shard_path
from selfreward.storage import RunLayout, load_jsonl
from selfreward.testing.fake_gemini import FakeGemini, fake_gemini

KEY = "served-test-key"
FIRST = '"model_identifier": "m",\n        "output": """'
SECOND = '"""\n    },\n    {\n        "model_identifier": "M",\n        "output": """'
END = '"""\n    }\n}'


def outputs_of(prompt: str) -> tuple[str, str]:
    """output_1 and output_2 of the AlpacaEval-style pairwise prompt, whatever they contain."""
    start = prompt.index(FIRST) + len(FIRST)
    middle = prompt.index(SECOND, start)
    end = prompt.rindex(END)
    return prompt[start:middle], prompt[middle + len(SECOND) : end]


def longer_wins(model: str, prompt: str, body: dict[str, Any]) -> str:
    first, second = outputs_of(prompt)
    return "M" if len(second) > len(first) else "m"


def expected_preference(a: str, b: str) -> float:
    if a.strip() == b.strip():
        return 0.5  # identical: a tie without a judge call
    return 1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5  # equal length: the orders disagree


@pytest.fixture(scope="module")
def gemini() -> Iterator[FakeGemini]:
    with fake_gemini(api_key=KEY, reply=longer_wins) as fake:
        yield fake


@pytest.fixture()
def adapter(policy_server, tiny_lora_dir: Path) -> Iterator[str]:
    """The LoRA adapter served as a second model, unloaded afterwards (the server is shared)."""
    name = "eval-m2"

    async def call(load: bool) -> None:
        async with OpenAICompatClient(policy_server.url) as client:
            if load:
                await client.load_adapter(name, str(tiny_lora_dir))
            else:
                await client.unload_adapter(name)

    asyncio.run(call(True))
    yield name
    asyncio.run(call(False))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


PROMPTS = [
    "Explain how photosynthesis works in simple terms.",
    "Write a short poem about the sea at night.",
    "What are three tips for learning a new language?",
    "Give me a recipe for a quick vegetable soup.",
    "How do I reverse a list in Python?",
]


def served_eval_setup(tmp_path: Path, **eval_fields: Any) -> tuple[RunConfig, RunLayout]:
    """The evaluation prompts, a short judge template and two EFT-eval records."""
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    )
    # the tiny model's 1024-token context cannot hold the built-in judge prompt: a short one
    template = tmp_path / "short-judge.txt"
    template.write_text("Rate the answer from 0 to 5.\nQuestion: {instruction}\nAnswer: {response}\n")
    config = RunConfig(
        name="served",
        artifact_root=tmp_path,
        judge={"mode": "logprob", "samples": 1, "template": str(template)},
        eval={
            "prompts": str(prompts),
            "max_prompts": 4,
            "max_tokens": 12,
            "bootstrap_samples": 200,
            **eval_fields,
        },
    )
    layout = RunLayout(tmp_path, "served")
    layout.seed_dir.mkdir(parents=True)
    replies = [("Plants use light to make sugar.", 0), ("I do not know.", 1), ("Sugar.", 2)]
    (layout.seed_dir / "eft_eval.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "id": f"e{i}",
                    "tree_id": f"t{i}",
                    "prompt": PROMPTS[i],
                    "replies": [
                        {"message_id": f"e{i}-{j}", "text": t, "rank": r} for j, (t, r) in enumerate(replies)
                    ],
                }
            )
            + "\n"
            for i in range(2)
        )
    )
    return config, layout


def evaluate_served(
    config: RunConfig,
    layout: RunLayout,
    policy_server,
    adapter: str,
    gemini: FakeGemini,
    sharding: Sharding | None = None,
) -> dict[str, Any]:
    """Evaluate the adapter (M2) against the base model (M1) after iteration 1."""

    async def run() -> dict[str, Any]:
        judge = make_judge(
            "gemini:pairwise-test",
            JudgeConfig(samples=1, max_retries=0),
            teacher=TeacherConfig(gemini_base_url=gemini.base_url),
        )
        rm_judge = make_judge(f"policy:{adapter}", config.judge, policy_url=policy_server.url)
        client = OpenAICompatClient(policy_server.url)
        try:
            return await evaluate_iteration(
                config,
                layout,
                1,
                adapter,
                policy_server.model,
                judge,
                client,
                rm_judge=rm_judge,
                sharding=sharding,
            )
        finally:
            await judge.aclose()
            await rm_judge.aclose()
            await client.aclose()

    return asyncio.run(run())


def test_evaluate_iteration_with_served_models(
    policy_server, adapter: str, gemini: FakeGemini, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    config, layout = served_eval_setup(tmp_path)

    def run() -> dict[str, Any]:
        return evaluate_served(config, layout, policy_server, adapter, gemini)

    gemini.reset()
    data = run()
    answers_dir = layout.eval_dir / "answers"
    new = {r["prompt_id"]: r for r in load_jsonl(answers_dir / f"answers-{adapter}.jsonl")}
    base = {r["prompt_id"]: r for r in load_jsonl(answers_dir / "answers-tiny.jsonl")}
    assert len(new) == len(base) == 4 and set(new) == set(base)
    assert {r["model"] for r in new.values()} == {adapter} and {
        r["settings"]["max_tokens"] for r in new.values()
    } == {12}
    prefs = [expected_preference(new[p]["output"], base[p]["output"]) for p in sorted(new)]
    h = data["head2head"]
    assert (h["a"], h["b"], h["n"], h["failures"]) == (adapter, "tiny", 4, 0)
    assert (h["wins"], h["ties"], h["losses"]) == (prefs.count(1.0), prefs.count(0.5), prefs.count(0.0))
    assert h["win_rate"] == pytest.approx(sum(prefs) / 4)
    assert gemini.calls == 2 * sum(
        1 for p in sorted(new) if new[p]["output"].strip() != base[p]["output"].strip()
    )

    rm = data["reward_model"]
    assert rm["judge"] == f"policy:{adapter}" and rm["responses_compared"] == 6 and rm["pairs"] == 6
    scores = [
        c["score"]
        for r in load_jsonl(layout.eval_dir / "iter-1" / f"rm-scores-policy_{adapter}.jsonl")
        for c in r["completion"].values()
    ]
    assert all(s == -1 or 0 <= s <= 5 for s in scores)
    assert rm["parse_failure_rate"] == pytest.approx(sum(s == -1 for s in scores) / 6)
    assert 0 <= rm["pairwise_accuracy"] <= 1
    out = layout.eval_dir / "iter-1"
    assert json.loads((out / "report.json").read_text())["plots"] == [
        "rm_scores.png",
        "trends.png",
        "win_tie_loss.png",
    ]

    # resume: nothing is generated or judged again
    before = {p.name: p.read_bytes() for p in answers_dir.iterdir()}
    gemini.reset()
    again = run()
    assert {p.name: p.read_bytes() for p in answers_dir.iterdir()} == before
    assert gemini.calls == 0 and again["head2head"]["win_rate"] == h["win_rate"]


def test_sharded_evaluation_judges_each_record_once_and_merges_in_prompt_order(
    policy_server, adapter: str, gemini: FakeGemini, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The evaluate stage in 3 shard jobs then its own job: each shard answers, judges and
    scores every third prompt and EFT-eval record into shard files (a shard run again does
    nothing twice), the stage's job merges them in prompt order, calls no judge and generates
    nothing again, deletes the shard files and reports over every prompt."""
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    config, layout = served_eval_setup(tmp_path)
    answers_dir, out = layout.eval_dir / "answers", layout.eval_dir / "iter-1"
    stores = [
        answers_dir / f"answers-{adapter}.jsonl",
        answers_dir / "answers-tiny.jsonl",
        out / f"verdicts-{adapter}-vs-tiny.jsonl",
        out / f"rm-scores-policy_{adapter}.jsonl",
    ]
    gemini.reset()
    parts = [
        evaluate_served(config, layout, policy_server, adapter, gemini, Sharding(3, i)) for i in range(3)
    ]
    assert [p["shard"] for p in parts] == [[0, 3], [1, 3], [2, 3]]
    order = [
        p.id
        for p in load_prompt_set(
            config.eval.prompts, seed_dir=layout.seed_dir, max_prompts=4, seed=config.seed
        )
    ]
    split = assign(order, 3)  # 4 prompts: 2, 1, 1
    assert [p[f"head2head {policy_server.model}"] for p in parts] == [2, 1, 1]
    assert [p["reward_model"] for p in parts] == [1, 1, 0]  # 2 EFT-eval records
    assert not any(path.exists() for path in stores) and not (out / "report.json").exists()
    for i in range(3):
        for store in stores[:3]:
            keys = {r["prompt_id"] for r in load_jsonl(shard_path(store, i, 3))}
            assert keys == {p for p, s in split.items() if s == i}
    calls = gemini.calls
    again = evaluate_served(config, layout, policy_server, adapter, gemini, Sharding(3, 0))
    assert again[f"head2head {policy_server.model}"] == 2 and gemini.calls == calls  # resumed

    shards_bytes = {
        p.name: p.read_bytes() for d in (answers_dir, out) for p in d.iterdir() if ".shard-" in p.name
    }
    data = evaluate_served(config, layout, policy_server, adapter, gemini, Sharding(3))
    assert gemini.calls == calls  # every verdict came from the shards
    assert not any(".shard-" in p.name for d in (answers_dir, out) for p in d.iterdir())
    merged = {}
    for store in stores:
        recs = load_jsonl(store)
        merged[store.name] = recs
        ids = [r["prompt_id"] for r in recs]
        assert len(ids) == len(set(ids))  # each record once
    for store in stores[:3]:
        assert [r["prompt_id"] for r in merged[store.name]] == order  # the prompts' order
    assert [r["prompt_id"] for r in merged[stores[3].name]] == ["e0", "e1"]
    shard_records = [
        json.loads(line) for b in shards_bytes.values() for line in b.decode().splitlines() if line
    ]
    assert sorted(json.dumps(r, sort_keys=True) for r in shard_records) == sorted(
        json.dumps(r, sort_keys=True) for recs in merged.values() for r in recs
    )  # the merged stores hold exactly the shards' records
    new = {r["prompt_id"]: r["output"] for r in merged[stores[0].name]}
    base = {r["prompt_id"]: r["output"] for r in merged[stores[1].name]}
    prefs = [expected_preference(new[p], base[p]) for p in sorted(new)]
    h = data["head2head"]
    assert (h["n"], h["failures"], h["wins"], h["ties"], h["losses"]) == (
        4,
        0,
        prefs.count(1.0),
        prefs.count(0.5),
        prefs.count(0.0),
    )
    assert data["reward_model"]["responses_compared"] == 6
    assert json.loads((out / "report.json").read_text())["head2head"]["win_rate"] == h["win_rate"]


def test_head2head_command_with_served_models(
    policy_server, adapter: str, gemini: FakeGemini, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"instruction": p} for p in PROMPTS[:3]])
    config = tmp_path / "run.yaml"
    config.write_text(f"teacher:\n  gemini_base_url: {gemini.base_url}\njudge:\n  samples: 1\n")
    out = tmp_path / "h2h"
    args = [
        "eval",
        "head2head",
        "--a",
        adapter,
        "--b",
        policy_server.model,
        "--judge",
        "gemini:g",
        "--prompts",
        str(prompts),
        "--out-dir",
        str(out),
        "--config",
        str(config),
        "--policy-url",
        policy_server.url,
        "--max-tokens",
        "8",
        "--bootstrap",
        "100",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    a = {r["instruction"]: r["output"] for r in load_jsonl(out / f"answers-{adapter}.jsonl")}
    b = {r["instruction"]: r["output"] for r in load_jsonl(out / "answers-tiny.jsonl")}
    prefs = [expected_preference(a[p], b[p]) for p in PROMPTS[:3]]
    assert data["n"] == 3 and data["win_rate"] == pytest.approx(sum(prefs) / 3)
    assert data["generation"]["max_tokens"] == 8 and data["sources"] == {
        adapter: "generated",
        "tiny": "generated",
    }
