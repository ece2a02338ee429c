"""`selfreward data prepare` and `data show`: the command, its options, its errors; the run's
prepare stage building the judge of judge-filtered EFT targets from the run config."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfreward.cli.main import app
from selfreward.storage import load_jsonl

runner = CliRunner()


def test_prepare_demo_prints_counts_and_reasons_then_is_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "seed"
    result = runner.invoke(app, ["data", "prepare", "--source", "demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for text in (
        "ift.jsonl",
        "eft_train.jsonl",
        "eft_eval.jsonl",
        "dropped, by reason",
        "prompt.lang",
        "reply.deleted",
    ):
        assert text in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert f"│ {manifest['outputs']['ift.jsonl']['records']} " in result.output
    again = runner.invoke(app, ["data", "prepare", "--source", "demo", "--out", str(out)])
    assert again.exit_code == 0 and "up to date" in again.output
    shown = runner.invoke(app, ["data", "show", str(out)])
    assert shown.exit_code == 0 and "eft_eval.jsonl" in shown.output and "prompt.deleted" in shown.output


def test_options_override_the_run_config_and_default_to_its_seed_folder(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        f"name: exp1\nartifact_root: {tmp_path / 'artifacts'}\ndata:\n  source: demo\n  max_ift: 9\n  languages: [en]\n"
    )
    result = runner.invoke(
        app, ["data", "prepare", "--config", str(config), "--max-ift", "4", "--languages", "en, de"]
    )
    assert result.exit_code == 0, result.output
    seed = tmp_path / "artifacts" / "runs" / "exp1" / "seed"
    assert len(load_jsonl(seed / "ift.jsonl")) == 4
    settings = json.loads((seed / "manifest.json").read_text())["settings"]
    assert settings["languages"] == ["en", "de"] and settings["max_ift"] == 4
    # the environment overrides the file (SELFREWARD_DATA__*), the command line overrides both
    env = {"SELFREWARD_DATA__MAX_IFT": "3"}
    result = runner.invoke(app, ["data", "prepare", "--config", str(config)], env=env)
    assert result.exit_code == 0 and len(load_jsonl(seed / "ift.jsonl")) == 3


def test_errors_are_one_line_with_exit_status_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"message_tree_id": "t", "prompt": {"message_id": "t"\n')
    result = runner.invoke(app, ["data", "prepare", "--source", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "bad.jsonl:1: not valid JSON" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["data", "prepare", "--source", "demo"])
    assert result.exit_code == 2 and "--out is required" in result.output
    result = runner.invoke(app, ["data", "prepare", "--out", str(tmp_path / "o"), "--eval-fraction", "1.5"])
    assert result.exit_code == 2 and "data.eval_fraction" in result.output
    result = runner.invoke(app, ["data", "prepare", "--out", str(tmp_path / "o"), "--languages", "xx"])
    assert result.exit_code == 2 and "the prompt filter 'lang' removed all" in result.output
    result = runner.invoke(
        app, ["data", "prepare", "--out", str(tmp_path / "o"), "--eft-targets", "judge-filtered"]
    )
    assert result.exit_code == 2 and "judge-filtered" in result.output
    result = runner.invoke(app, ["data", "show", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "manifest.json: not found" in result.output


def test_the_installed_command(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "selfreward"
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(
        [str(exe), "data", "prepare", "--source", "demo", "--out", str(tmp_path / "seed")],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "ift.jsonl" in done.stdout and (tmp_path / "seed" / "manifest.json").is_file()


GEMINI_EFT_CALLS = 13  # replies judged by judged_trees' judge


def judged_trees(tmp_path: Path) -> tuple[Path, Callable[[str, str, dict], str]]:
    """OASST trees with ranked replies, and a Gemini fake's reply function whose verdict depends on
    the reply being judged (agreeing, disagreeing, tied and unparseable cases)."""
    verdicts = {
        "A1": "Complete.\nScore: 5", "A2": "Good.\nScore: 4", "A3": "Partial.\nScore: 2",
        "B1": "Helpful.\nScore: 4", "B2": "Vague.\nScore: 3",
        "C1": "Helpful.\nScore: 4", "C2": "Off topic.\nScore: 1",
        "E1": "Right.\nScore: 4", "E2": "Some.\nScore: 2",
        "D1": "Fine.\nScore: 3", "D2": "Also fine.\nScore: 3",
        "G1": "Good.\nScore: 4", "G2": "I cannot decide.",
    }  # fmt: skip
    groups = {
        "a": ["A1", "A2", "A3"],
        "b": ["B1", "B2"],
        "c": ["C1", "C2"],
        "e": ["E1", "E2"],
        "d": ["D1", "D2"],
    }
    groups["g"] = ["G1", "G2"]
    src = tmp_path / "in.jsonl"
    with src.open("w") as fh:
        for tid, texts in groups.items():
            replies = [
                {"message_id": t.lower(), "text": t, "role": "assistant", "lang": "en", "rank": i}
                for i, t in enumerate(texts)
            ]
            prompt = {"message_id": tid, "text": f"question {tid}?", "role": "prompter", "lang": "en"}
            fh.write(json.dumps({"message_tree_id": tid, "prompt": {**prompt, "replies": replies}}) + "\n")

    def reply(model: str, prompt: str, body: dict) -> str:
        found = re.search(r"<response>(.*?)</response>", prompt, re.DOTALL)
        assert found is not None and model == "gemini-test"
        return verdicts[found.group(1)]

    return src, reply


def test_judge_filtered_targets_through_a_gemini_judge(tmp_path: Path) -> None:
    """The CLI builds the judge from data.eft_judge (selfreward.judging) and talks to a local server
    speaking Gemini's REST wire format; the verdict depends on the reply being judged."""
    from selfreward.testing.fake_gemini import fake_gemini

    src, reply = judged_trees(tmp_path)
    with fake_gemini(api_key="test-key", reply=reply) as fake:
        config = tmp_path / "run.yaml"
        config.write_text(
            "data:\n"
            f"  source: {src}\n  eval_fraction: 0.0\n  eft_targets: judge-filtered\n  eft_judge: gemini:gemini-test\n"
            f"teacher:\n  gemini_base_url: {fake.base_url}\n"
        )
        args = ["data", "prepare", "--config", str(config), "--out", str(tmp_path / "seed")]
        result = runner.invoke(app, args, env={"GEMINI_API_KEY": "test-key"})
        assert result.exit_code == 0, result.output
        assert fake.calls == GEMINI_EFT_CALLS and all(r.key_ok for r in fake.requests)
        again = runner.invoke(app, [*args, "--force"], env={"GEMINI_API_KEY": "test-key"})
        assert (
            again.exit_code == 0 and fake.calls == GEMINI_EFT_CALLS
        )  # verdicts reused from eft_judgments.jsonl
    manifest = json.loads((tmp_path / "seed" / "manifest.json").read_text())
    targets = manifest["eft_targets"]
    assert (
        targets["judge"].startswith("gemini:gemini-test|template=")
        and targets["judge_backend"] == "gemini:gemini-test"
    )
    assert (
        manifest["dropped"]["eft_train.judge_disagrees"] == 1
        and manifest["dropped"]["eft_train.judge_unparseable"] == 1
    )
    assert (
        targets["scores_before"] == {"1": 1, "2": 2, "3": 1, "4": 4, "5": 1}
        and targets["rows_downsampled"] == 2
    )
    rows = {r["id"]: r for r in load_jsonl(tmp_path / "seed" / "eft_train.jsonl")}
    assert len(rows) == 7 and rows["a1"]["justification"] == "Complete." and rows["a1"]["score"] == 5


def test_judge_filtered_targets_in_a_runs_prepare_stage(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stage 0 of a run (the loop's `prepare`) builds the same judge from the run config and writes
    the same judge-filtered EFT targets as the CLI."""
    from selfreward.config import RunConfig
    from selfreward.stages.plan import stage_named
    from selfreward.stages.stage import StageContext, run_stage
    from selfreward.storage import RunLayout
    from selfreward.testing.fake_gemini import fake_gemini

    src, reply = judged_trees(tmp_path)
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    with fake_gemini(api_key="test-key", reply=reply) as fake:
        config = RunConfig.model_validate(
            {
                "name": "eft",
                "artifact_root": str(tmp_path / "artifacts"),
                "model": {"base": str(tiny_model_dir), "served_name": "tiny"},
                "data": {
                    "source": str(src),
                    "eval_fraction": 0.0,
                    "eft_targets": "judge-filtered",
                    "eft_judge": "gemini:gemini-test",
                },
                "teacher": {"gemini_base_url": fake.base_url},
            }
        )
        layout = RunLayout(config.artifact_root, config.name)
        manifest = run_stage(StageContext(config, layout, 0), stage_named("prepare"))
        assert fake.calls == GEMINI_EFT_CALLS and all(r.key_ok for r in fake.requests)
    assert manifest["seed_counts"]["eft_train"] == 7
    seed = json.loads((layout.seed_dir / "manifest.json").read_text())
    assert seed["eft_targets"]["judge_backend"] == "gemini:gemini-test"
    rows = {r["id"]: r for r in load_jsonl(layout.seed_dir / "eft_train.jsonl")}
    assert len(rows) == 7 and rows["a1"]["justification"] == "Complete." and rows["a1"]["score"] == 5
