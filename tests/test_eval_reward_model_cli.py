"""`selfreward eval reward-model`: the command line writes the metrics the issue names."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfreward.cli.main import app


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def scores(pid: str, values: list[float], texts: list[str] | None = None) -> dict:
    texts = texts or [f"{pid}-{i}" for i in range(len(values))]
    return {
        "prompt_id": pid,
        "prompt": f"q {pid}",
        "completion": {
            str(i): {"content": t, "score": v} for i, (t, v) in enumerate(zip(texts, values, strict=True))
        },
    }


REQUIRED = {
    "pairwise_accuracy",
    "five_best",
    "exact_match",
    "spearman",
    "kendall_tau",
    "excluding_unparseable",
    "parse_failure_rate",
    "prompts_compared",
    "prompts_only_in_scores",
    "prompts_only_in_reference",
}


def test_reference_judge_command(tmp_path: Path) -> None:
    judge = write_jsonl(
        tmp_path / "judge.jsonl", [scores("a", [5, 3, -1]), scores("b", [4, 4]), scores("c", [2])]
    )
    ref = write_jsonl(
        tmp_path / "gpt4.jsonl", [scores("a", [5, 4, 2]), scores("b", [4, 4]), scores("d", [1])]
    )
    out = tmp_path / "out.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "reward-model",
            "--scores",
            str(judge),
            "--reference",
            str(ref),
            "--json",
            str(out),
            "--out-dir",
            str(tmp_path / "report"),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data.keys() >= REQUIRED
    metric_keys = {"pairwise_accuracy", "five_best", "exact_match", "spearman", "kendall_tau"}
    assert data["excluding_unparseable"].keys() >= metric_keys
    # (5,5) (3,4) (-1,2) (4,4) (4,4): 3 of 5 equal; a differs, b equal
    assert data["pairwise_accuracy"] == pytest.approx(3 / 5)
    assert data["five_best"] == 1.0 and data["exact_match"] == 0.5
    assert data["excluding_unparseable"]["pairwise_accuracy"] == pytest.approx(3 / 4)
    assert data["parse_failure_rate"] == pytest.approx(1 / 5)
    assert (data["prompts_compared"], data["prompts_only_in_scores"], data["prompts_only_in_reference"]) == (
        2,
        1,
        1,
    )
    for key in ("pairwise_accuracy", "five_best", "exact_match"):
        assert 0.0 <= data[key] <= 1.0
    for key in ("spearman", "kendall_tau"):
        assert -1.0 <= data[key] <= 1.0
    assert "parse-failure rate: 20.0%" in result.output
    report = tmp_path / "report"
    assert (report / "score_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (report / "report.md").read_text()
    assert "| pairwise accuracy (score equals the reference's) | 60.0% | 75.0% |" in md
    assert json.loads((report / "report.json").read_text())["plots"] == ["score_histogram.png"]


def test_human_ranks_command(tmp_path: Path) -> None:
    eft = write_jsonl(
        tmp_path / "eft_eval.jsonl",
        [
            {
                "id": "e1",
                "tree_id": "t1",
                "prompt": "q e1",
                "replies": [
                    {"message_id": f"m{i}", "text": f"e1-{i}", "rank": r} for i, r in enumerate([1, 0, 2])
                ],
            },
            {
                "id": "e2",
                "tree_id": "t2",
                "prompt": "q e2",
                "replies": [{"message_id": f"n{i}", "text": f"e2-{i}", "rank": i} for i in range(2)],
            },
        ],
    )
    judge = write_jsonl(tmp_path / "judge.jsonl", [scores("e1", [3, 5, 1]), scores("e2", [2, 2])])
    out = tmp_path / "out.json"
    result = CliRunner().invoke(
        app, ["eval", "reward-model", "--scores", str(judge), "--human", str(eft), "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data.keys() >= REQUIRED
    # e1: all 3 pairs agree (5 > 3 > 1 matches ranks 0 < 1 < 2); e2: one tied pair
    assert data["pairwise_accuracy"] == pytest.approx(3 / 4)
    assert data["pairwise_accuracy_ties_half"] == pytest.approx(3.5 / 4)
    assert data["exact_match"] == 0.5 and data["five_best"] == 1.0
    assert data["spearman"] == pytest.approx(1.0)  # e2 is undefined (constant scores), left out
    assert data["correlation_undefined_prompts"] == 1
    assert math.isclose(data["parse_failure_rate"], 0.0)


def test_reward_model_command_errors_are_one_line(tmp_path: Path) -> None:
    judge = write_jsonl(tmp_path / "judge.jsonl", [scores("a", [9])])
    result = CliRunner().invoke(
        app, ["eval", "reward-model", "--scores", str(judge), "--reference", str(judge)]
    )
    assert result.exit_code == 2
    assert "judge.jsonl:1 (prompt_id a): field 'completion.0.score'" in result.output
    result = CliRunner().invoke(app, ["eval", "reward-model", "--scores", str(judge)])
    assert result.exit_code == 2 and "exactly one of --reference" in result.output
