"""Judge-collapse tracking: the score distribution of an iteration's judge, the collapse flag, and
a collapsed judge stopping the next iteration (embedded and REST) unless the config says go on."""

from __future__ import annotations

import math
from pathlib import Path

from fastapi.testclient import TestClient

from selfreward.config import RunConfig
from selfreward.evaluation.judge_health import collapse_stop, judge_health
from selfreward.schemas import JudgmentRecord, Verdict
from selfreward.stages.plan import ITERATION, SETUP
from selfreward.storage import RunLayout, write_jsonl_atomic, write_manifest


def write_judgments(layout: RunLayout, t: int, scores: list[float | None]) -> None:
    rows = [
        JudgmentRecord(
            id=f"p{i}:0", prompt_id=f"p{i}", index=0, judge="policy:m1-abc", template_sha256="t", mode="sample",
            verdicts=[Verdict(text="x", score=s, failure=None if s is not None else "unparseable: x")], score=s,
            failures=int(s is None),
        ).model_dump(mode="json")
        for i, s in enumerate(scores)
    ]  # fmt: skip
    write_jsonl_atomic(layout.stage_file(t, "judgments"), rows)


def test_score_shares_entropy_and_the_collapse_flag(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "r")
    # means 4.5 and 4.6 round half up to 5; 3.49 to 3; one unparseable
    write_judgments(layout, 1, [5, 5, 4.5, 4.6, 3.49, 1, None, 5])
    write_manifest(layout.stage_manifest(1, "pairs"), {"mean_lengths": {"chosen": 120.5, "rejected": 300.0}})
    h = judge_health(layout, 1, threshold=0.9)
    assert h is not None
    assert h["score_shares"] == {"0": 0.0, "1": 0.1429, "2": 0.0, "3": 0.1429, "4": 0.0, "5": 0.7143}
    expected = -(2 * (1 / 7) * math.log2(1 / 7) + (5 / 7) * math.log2(5 / 7))
    assert math.isclose(h["entropy_bits"], expected, abs_tol=1e-3)
    assert (h["top_score"], h["top_share"], h["collapsed"]) == (5, 0.7143, False)
    assert h["parse_failure_rate"] == 0.125 and h["scored"] == 7 and h["candidates"] == 8
    assert (h["chosen_length"], h["rejected_length"]) == (120.5, 300.0)
    assert judge_health(layout, 1, threshold=0.7)["collapsed"] is True
    assert judge_health(layout, 2, threshold=0.9) is None  # no judgments (teacher-demo)
    write_judgments(layout, 3, [None, None])
    assert judge_health(layout, 3, threshold=0.9)["collapsed"] is True  # nothing scored at all


def test_trends_show_the_judge_and_the_answer_lengths() -> None:
    """Across iterations: the judge's rates on the rate axis, the chosen and rejected lengths on their
    own, and one summary row per model with its top-score share, parse failures and lengths."""
    from selfreward.reports.plots import metric_trends
    from selfreward.reports.run_report import _summary_rows
    from selfreward.reports.trends import length_series, trend_series

    health = [
        {"top_share": 0.5, "entropy_bits": 2.585, "parse_failure_rate": 0.1, "chosen_length": 100.0,
         "rejected_length": 250.4, "collapsed": False},
        {"top_share": 0.95, "entropy_bits": 0.2585, "parse_failure_rate": 0.0, "chosen_length": 80.0,
         "rejected_length": None, "collapsed": True},
    ]  # fmt: skip
    reports = [{"iteration": t, "model": f"m{t + 1}", "judge_health": h} for t, h in enumerate(health, 1)]
    reports.insert(0, {"iteration": 0, "model": "m1"})  # measured nothing about the judge
    labels, series = trend_series(reports)
    assert labels == ["m1", "m2", "m3"]
    assert series["judge: share of its top score"] == [None, 0.5, 0.95]
    assert [None if v is None else round(v, 3) for v in series["judge: score entropy / log2(6)"]] == [
        None, 1.0, 0.1,
    ]  # fmt: skip
    assert series["judge: parse-failure rate"] == [None, 0.1, 0.0]
    assert "win rate vs previous model" not in series  # never measured: no line
    assert length_series(reports) == {
        "chosen answers": [None, 100.0, 80.0],
        "rejected answers": [None, 250.4, None],
    }
    rows = _summary_rows(reports)
    assert [r[-3:] for r in rows] == [
        ["-", "-", "-"], ["50.0%", "10.0%", "100 / 250"], ["95.0% (collapsed)", "0.0%", "80 / -"],
    ]  # fmt: skip
    one = metric_trends(labels, series)
    two = metric_trends(labels, series, lengths=length_series(reports))
    assert one[:8] == two[:8] == b"\x89PNG\r\n\x1a\n"
    height = lambda png: int.from_bytes(png[20:24], "big")  # noqa: E731  (the IHDR height)
    assert height(two) > height(one)


def collapsed_run(tmp_path: Path, **eval_: object) -> tuple[RunConfig, RunLayout]:
    config = RunConfig(name="c", artifact_root=tmp_path / "art", iterations=2, eval=eval_)
    layout = RunLayout(config.artifact_root, "c")
    results = {
        (0, "prepare"): {
            "base_model_dir": "/m",
            "base_served_name": "m0",
            "seed_dir": "/s",
            "seed_counts": {},
        },
        (0, "publish"): {"model": "m1", "served_name": "m1-abc"},
        (1, "publish"): {"model": "m2", "served_name": "m2-def"},
    }
    for t, stages in ((0, SETUP), (1, ITERATION)):
        for s in stages:
            write_manifest(
                layout.stage_manifest(t, s.name), {"stage": s.name, **results.get((t, s.name), {})}
            )
    write_judgments(layout, 1, [5.0] * 19 + [4.0])  # 95% fives
    write_manifest(
        layout.stage_manifest(1, "evaluate"), {"stage": "evaluate", "metrics": {"judge_collapsed": True}}
    )
    return config, layout


def test_a_collapsed_judge_stops_the_next_iteration(
    tmp_path: Path, redis_url: str, redis_conn: object
) -> None:
    from selfreward.api.coordinator.app import create_app
    from selfreward.drivers.embedded import run_embedded

    config, layout = collapsed_run(tmp_path)
    stop = collapse_stop(layout, 1, config)
    assert stop is not None and "95% of the scores of policy:m1-abc are 5" in stop
    assert collapse_stop(layout, 0, config) is None
    go_on, _ = collapsed_run(tmp_path / "b", continue_on_collapse=True)
    assert collapse_stop(RunLayout(go_on.artifact_root, "c"), 1, go_on) is None
    # embedded: nothing of iteration 2 runs, the result says why
    result = run_embedded(config, policy_url="http://127.0.0.1:9")
    assert result.stopped == stop and all(o.t < 2 for o in result.outcomes)
    # REST: the next iteration is refused with the reason, the iteration's status flags it
    env = {"SELFREWARD_ARTIFACT_ROOT": str(tmp_path / "art")}
    with TestClient(create_app(redis_url=redis_url, api_token="t", environ=env)) as api:
        auth = {"Authorization": "Bearer t"}
        assert api.post("/runs", json={"name": "c", "iterations": 2}, headers=auth).status_code == 201
        r = api.post("/runs/c/iterations", headers=auth)
        assert r.status_code == 409 and "judge collapse in iteration 1" in r.json()["detail"]
        detail = api.get("/runs/c/iterations/1", headers=auth).json()
        assert detail["judge_collapse"] is True and "95%" in detail["warnings"][0]
