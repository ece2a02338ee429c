"""The coordinator's evaluate stage (`evaluate_iteration`): files, metrics, trends, resumability."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from selfreward.config import JudgeConfig, RunConfig, TeacherConfig
from selfreward.evaluation.iteration import evaluate_iteration
from selfreward.judging import make_judge
from selfreward.llm.openai import OpenAICompatClient
from selfreward.reports.run_report import build_run_report
from selfreward.storage import RunLayout, load_jsonl
from selfreward.testing.fake_gemini import FakeGemini, fake_gemini

KEY = "iteration-test-key"
RESPONSE = re.compile(r"<response>(.*?)</response>", re.S)


def scorer_reply(model: str, prompt: str, body: dict[str, Any]) -> str:
    """A judge that scores 'quality N' as N and anything else as unparseable."""
    response = RESPONSE.search(prompt)
    match = re.search(r"quality (\d)", response.group(1)) if response else None
    return f"Fine.\nScore: {match.group(1)}" if match else "No idea."


@pytest.fixture(scope="module")
def gemini() -> Iterator[FakeGemini]:
    with fake_gemini(api_key=KEY, reply=scorer_reply) as fake:
        yield fake


def eft_eval(layout: RunLayout, groups: list[list[tuple[str, int]]]) -> None:
    layout.seed_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, group in enumerate(groups):
        replies = [
            {"message_id": f"e{i}-{j}", "text": text, "rank": rank} for j, (text, rank) in enumerate(group)
        ]
        lines.append(
            json.dumps({"id": f"e{i}", "tree_id": f"t{i}", "prompt": f"question {i}", "replies": replies})
        )
    (layout.seed_dir / "eft_eval.jsonl").write_text("\n".join(lines) + "\n")


async def _evaluate(
    config: RunConfig, layout: RunLayout, t: int, model: str, gemini: FakeGemini
) -> dict[str, Any]:
    rm_judge = make_judge(
        "gemini:judge-test",
        JudgeConfig(samples=1, max_retries=0),
        teacher=TeacherConfig(gemini_base_url=gemini.base_url),
    )
    client = OpenAICompatClient("http://127.0.0.1:9")  # not used: no head-to-head without a baseline
    try:
        return await evaluate_iteration(config, layout, t, model, None, None, client, rm_judge=rm_judge)
    finally:
        await rm_judge.aclose()
        await client.aclose()


def test_reward_model_part_writes_reports_and_trends(
    gemini: FakeGemini, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    config = RunConfig(name="r", artifact_root=tmp_path)
    layout = RunLayout(tmp_path, "r")
    eft_eval(
        layout,
        [
            [("quality 5", 0), ("quality 3", 1), ("quality 1", 2)],  # all pairs agree
            [("quality 2", 0), ("quality 4", 1)],  # disagrees
            [("quality 4", 0), ("garbled", 1)],  # unparseable: -1 below 4, agrees in table 1
        ],
    )
    gemini.reset()
    data = asyncio.run(_evaluate(config, layout, 1, "m2", gemini))
    out = layout.eval_dir / "iter-1"
    rm = data["reward_model"]
    assert rm["judge"] == "gemini:judge-test"
    assert rm["pairwise_accuracy"] == pytest.approx(4 / 5) and rm["exact_match"] == pytest.approx(2 / 3)
    assert rm["excluding_unparseable"]["pairwise_accuracy"] == pytest.approx(3 / 4)
    assert rm["parse_failure_rate"] == pytest.approx(1 / 7)
    assert data["head2head"] is None and data["metrics"]["rm_pairwise_accuracy"] == rm["pairwise_accuracy"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["plots"] == ["rm_scores.png", "trends.png"]
    assert (out / "rm_scores.png").read_bytes()[:4] == b"\x89PNG"
    assert "Reward-modeling ability (EFT eval)" in (out / "report.md").read_text()
    assert len(load_jsonl(out / "rm-scores-gemini_judge-test.jsonl")) == 3
    calls = gemini.calls
    assert calls == 7

    # re-running the stage scores nothing again and gives the same report
    again = asyncio.run(_evaluate(config, layout, 1, "m2", gemini))
    assert gemini.calls == calls and again["reward_model"] == rm

    # the next iteration's trends include both models; the run page shows both evaluations
    data2 = asyncio.run(_evaluate(config, layout, 2, "m3", gemini))
    assert data2["reward_model"]["pairwise_accuracy"] == rm["pairwise_accuracy"]
    page = build_run_report(layout).read_text()
    assert "Evaluation of m2" in page and "Evaluation of m3" in page
