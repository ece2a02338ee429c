"""`selfreward report RUN`: one self-contained HTML page from a run's artifact folder."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from typer.testing import CliRunner

from selfreward.cli.main import app
from selfreward.evaluation.metrics.reward_model import compare_with_human, parse_scored_record
from selfreward.evaluation.metrics.winrate import head_to_head
from selfreward.reports.files import write_report
from selfreward.reports.markdown import iteration_markdown
from selfreward.reports.plots import metric_trends, win_tie_loss_bars
from selfreward.reports.trends import iteration_reports, trend_series
from selfreward.schemas import EFTEvalRecord
from selfreward.storage import RunLayout, atomic_write_json, write_jsonl_atomic, write_manifest

PNG = b"\x89PNG\r\n\x1a\n"


def make_eval(layout: RunLayout, t: int, model: str, baseline: str, prefs: list[float]) -> None:
    h2h = {"kind": "head2head", **head_to_head(prefs, a=model, b=baseline, bootstrap_samples=200).to_json()}
    h2h.update(judge="gemini:fake", prompts="ift-eval")
    eft = [
        EFTEvalRecord(
            id="e",
            tree_id="t",
            prompt="q",
            replies=[
                {"message_id": "a", "text": "x", "rank": 0},
                {"message_id": "b", "text": "y", "rank": 1},
            ],
        )
    ]
    scores = {
        "e": parse_scored_record(
            {"prompt_id": "e", "completion": {"0": {"score": 4}, "1": {"score": 2 + t}}}, "s"
        )
    }
    rm = compare_with_human(scores, eft).to_json()
    data = {
        "kind": "iteration",
        "run": layout.run,
        "iteration": t,
        "model": model,
        "baseline": baseline,
        "judge": "gemini:fake",
        "prompts": "ift-eval",
        "head2head": h2h,
        "reward_model": {"judge": model, **rm},
    }
    labels, series = trend_series([*iteration_reports(layout), data])
    plots = {"win_tie_loss.png": win_tie_loss_bars([h2h]), "trends.png": metric_trends(labels, series)}
    write_report(
        layout.eval_dir / f"iter-{t}", data, iteration_markdown({**data, "plots": sorted(plots)}), plots
    )


def test_run_report_embeds_every_iteration(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "artifacts", "demo")
    layout.run_dir.mkdir(parents=True)
    layout.config_path.write_text("name: demo\nvariant: self-reward\niterations: 2\nmodel: {base: tiny}\n")
    for t in (1, 2):
        write_manifest(layout.stage_manifest(t, "prompts"), {"count": 10 + t, "rounds": 2})
    write_manifest(
        layout.stage_manifest(1, "pairs"), {"pairs": 7, "dropped": {"ties": 2, "fewer_than_two_scored": 1}}
    )
    write_jsonl_atomic(
        layout.stage_file(1, "candidates"), [{"id": "p:0", "model": "m1<script>", "text": "a"}]
    )
    write_jsonl_atomic(
        layout.stage_file(1, "judgments"),
        [{"id": f"p:{i}", "score": s} for i, s in enumerate([1, 4.5, None, 5])],
    )
    atomic_write_json(layout.model_manifest("m2"), {"name": "m2", "sha256": "ab" * 32, "parent": "m1"})
    make_eval(layout, 1, "m2", "m1", [1.0, 0.5, 0.0, 1.0])
    make_eval(layout, 2, "m3", "m2", [1.0, 1.0, 1.0, 0.0])

    result = CliRunner().invoke(app, ["report", "demo", "--root", str(layout.root)])
    assert result.exit_code == 0, result.output
    page = (layout.run_dir / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<h1>Run demo</h1>" in page
    assert "m1&lt;script&gt;" in page and "<script>" not in page  # escaped
    assert "<h2>Iteration 1</h2>" in page and "<h2>Iteration 2</h2>" in page
    assert "count=11" in page and "dropped.ties=2" in page and "count=12" in page
    assert "Evaluation of m2" in page and "Evaluation of m3" in page
    # summary rows: iteration, model, baseline, win rate [CI], w/t/l
    assert re.search(r"<td class=\"n\">1</td><td>m2</td><td>m1</td><td>62.5% \[", page)
    assert "<td>2/1/1</td>" in page and "<td>3/0/1</td>" in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # trends + candidate histogram of iteration 1 + 2 plots per evaluation
    assert len(images) == 1 + 1 + 2 * 2
    assert all(base64.b64decode(i).startswith(PNG) for i in images)
    assert 'src="http' not in page and 'href="http' not in page  # self-contained
    reports = iteration_reports(layout)
    assert [r["model"] for r in reports] == ["m2", "m3"]
    assert json.loads((layout.eval_dir / "iter-2" / "report.json").read_text())["plots"] == [
        "trends.png",
        "win_tie_loss.png",
    ]


def test_run_report_of_a_fresh_run_and_a_missing_run(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "fresh")
    layout.run_dir.mkdir(parents=True)
    result = CliRunner().invoke(
        app, ["report", "fresh", "--root", str(tmp_path), "--out", str(tmp_path / "r.html")]
    )
    assert result.exit_code == 0, result.output
    assert "No evaluation yet." in (tmp_path / "r.html").read_text()
    result = CliRunner().invoke(app, ["report", "nope", "--root", str(tmp_path)])
    assert result.exit_code == 2 and "no such run" in result.output
