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


def test_the_report_opens_with_the_summary_then_curves_examples_and_the_raw_manifests(tmp_path: Path) -> None:
    """A person reads first whether each model beat its parent (a verdict only where the interval
    excludes 50%), then the curves and real examples; the manifests' fields are folded away."""
    import html

    from dashboard_run import finished_run, reward_model

    from selfreward.reports.run_report import build_run_report
    from selfreward.storage import load_jsonl

    layout = finished_run(tmp_path / "artifacts", "demo")
    page = build_run_report(layout).read_text()
    headings = re.findall(r"<h2>([^<]+)</h2>", page)
    assert headings[:4] == ["Summary", "Metrics by model", "Training curves", "Examples"]
    summary = page[page.index("<h2>Summary</h2>") : page.index("<h2>Metrics by model</h2>")]
    lines = re.findall(r'<p class="summary[^"]*">(.*?)</p>', summary)
    assert len(lines) == 2
    for t, line in zip((1, 2), lines, strict=True):
        h2h = json.loads((layout.eval_dir / f"iter-{t}" / "report.json").read_text())["head2head"]
        lo, hi = h2h["intervals"]["win_rate"]
        shown = f"M{t + 1} vs M{t}: win rate {100 * h2h['win_rate']:.1f}% [{100 * lo:.1f}%, {100 * hi:.1f}%] on {h2h['n']} prompts"
        assert line.startswith(shown), line
        if lo <= 0.5 <= hi:
            assert line.endswith("<strong>No evidence of a difference.</strong>")
        else:
            assert line.endswith(f"<strong>M{t + 1} is better than M{t}.</strong>") and lo > 0.5
    before, after = (reward_model(t)["pairwise_accuracy"] for t in (1, 2))
    assert (
        f"judge agreement with humans {100 * after:.1f}% ({100 * (after - before):+.1f} points)" in lines[1]
    )
    assert "answers 121 vs 100 characters (+21%)" in lines[0]
    # the training curves: one inline PNG from the models' log histories
    curves = re.search(r'<img alt="training curves" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert curves and base64.b64decode(curves.group(1)).startswith(PNG)
    # examples: the text of pairs.jsonl, and the evaluation's answers side by side
    examples = page[page.index("<h2>Examples</h2>") : page.index("<h2>Iteration 0</h2>")]
    pair = load_jsonl(layout.stage_file(1, "pairs"))[0]
    assert html.escape(pair["chosen"][0]["content"], quote=True) in examples
    assert html.escape(pair["rejected"][0]["content"], quote=True) in examples
    assert "m2 says answer 0" in examples and "m1 says answer 0" in examples
    # the manifests' fields only in the collapsed section at the end
    raw = page.index('<details id="raw-manifests">')
    assert page.index("<h4>model m2</h4>") > raw and page.index("adapter_sha256") > raw
    assert page.rstrip().endswith("</details></body></html>")
    assert 'src="http' not in page and 'href="http' not in page and "<script" not in page


def test_a_report_of_one_iteration_draws_no_lone_dot(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "artifacts", "one")
    layout.run_dir.mkdir(parents=True)
    layout.config_path.write_text("name: one\nvariant: self-reward\niterations: 1\nmodel: {base: tiny}\n")
    make_eval(layout, 1, "m2", "m1", [1.0, 0.5, 0.0, 1.0])
    result = CliRunner().invoke(app, ["report", "one", "--root", str(layout.root)])
    assert result.exit_code == 0, result.output
    page = (layout.run_dir / "report.html").read_text()
    assert 'alt="trends"' not in page  # a trend of one model is one dot: the evaluation's own plots show
    assert 'alt="win_tie_loss.png"' in page
    assert "M2 vs M1: win rate 62.5% [" in page and "<strong>No evidence of a difference.</strong>" in page
    assert "No training log yet" in page
