"""The Stage record, the plan (what is left to run), and running one stage (selfreward.stages)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from selfreward.config import RunConfig
from selfreward.errors import InputError, StageError
from selfreward.progress import Progress, ProgressEvent
from selfreward.stages import plan
from selfreward.stages.stage import QUEUES, Stage, StageContext, StageResult, run_stage
from selfreward.storage import RunLayout, read_manifest, write_jsonl_atomic, write_manifest


def layout_of(tmp_path: Path) -> tuple[RunConfig, RunLayout]:
    config = RunConfig(name="r", artifact_root=tmp_path)
    return config, RunLayout(tmp_path, "r")


def test_every_stage_record_is_complete() -> None:
    assert [s.name for s in plan.SETUP] == ["prepare", "sft", "publish"]
    assert [s.name for s in plan.ITERATION] == [
        "prompts", "candidates", "judgments", "pairs", "train", "publish", "evaluate"
    ]  # fmt: skip
    for stage in (*plan.SETUP, *plan.ITERATION):
        assert stage.queue in QUEUES and stage.timeout_s > 0 and stage.description
        assert issubclass(stage.result, StageResult) and asyncio.iscoroutinefunction(stage.run)
    assert {s.name: s.queue for s in plan.ITERATION} == {
        "prompts": "generate", "candidates": "generate", "judgments": "judge", "pairs": "judge",
        "train": "train", "publish": "generate", "evaluate": "evaluate",
    }  # fmt: skip
    # training runs a day at most, the rest 6 h; only GPU-bound stages leave the policy alone
    assert plan.stage_named("train").timeout_s == plan.stage_named("sft").timeout_s == 24 * 3600
    config = RunConfig()
    assert not any(plan.stage_named(n).needs_policy(config) for n in ("prepare", "sft", "pairs", "train"))
    assert all(plan.stage_named(n).needs_policy(config) for n in ("publish", "prompts", "judgments"))
    judged = RunConfig(data={"eft_targets": "judge-filtered", "eft_judge": "policy:m0"})
    assert plan.stage_named("prepare").needs_policy(judged)


def test_stage_named_lists_the_known_stages() -> None:
    with pytest.raises(StageError, match="not a stage of iteration 0 .*prepare, sft, publish"):
        plan.stage_named("judgments", 0)
    assert plan.stage_named("publish", 0) is plan.stage_named("publish", 3)


def test_pending_is_what_has_no_manifest_in_order(tmp_path: Path) -> None:
    _, layout = layout_of(tmp_path)
    assert [s.name for s in plan.pending(layout, 0)] == ["prepare", "sft", "publish"]
    write_manifest(layout.stage_manifest(0, "sft"), {"stage": "sft"})
    assert [s.name for s in plan.pending(layout, 0)] == ["prepare", "publish"]
    assert plan.completed_iterations(layout) == -1
    for s in plan.SETUP:
        write_manifest(layout.stage_manifest(0, s.name), {"stage": s.name})
    assert plan.pending(layout, 0) == [] and plan.completed_iterations(layout) == 0
    assert plan.pending(layout, 1)[0].name == "prompts"


def test_served_names_come_from_typed_results(tmp_path: Path) -> None:
    _, layout = layout_of(tmp_path)
    with pytest.raises(LookupError, match="M0 is not published"):
        plan.served_name(layout, 0)
    write_manifest(
        layout.stage_manifest(0, "prepare"),
        {
            "stage": "prepare",
            "base_model_dir": "/m",
            "base_served_name": "m0",
            "seed_dir": "/s",
            "seed_counts": {},
        },
    )
    write_manifest(
        layout.stage_manifest(0, "publish"), {"stage": "publish", "model": "m1", "served_name": "m1-abc"}
    )
    assert (plan.served_name(layout, 0), plan.served_name(layout, 1)) == ("m0", "m1-abc")
    with pytest.raises(LookupError, match="M2"):
        plan.served_name(layout, 2)


def test_a_results_summary_line() -> None:
    pairs = plan.stage_named("pairs").result_of(
        {"stage": "pairs", "seconds": 1.0, "pairs": 4, "tie_rate": 0.25, "parse_failure_rate": 0.0}
    )
    assert pairs.summary() == "pairs=4 tie_rate=0.25 parse_failure_rate=0"
    train = plan.stage_named("train").result_of(
        {"model": "m2", "steps": 8, "examples": 16, "metrics": {"first_loss": 0.69, "last_loss": 0.5}}
    )
    assert train.summary() == "m2 steps=8 examples=16 loss 0.69->0.5"
    judged = plan.stage_named("judgments").result_of({"skipped": "teacher-demo pairs need no judge"})
    assert judged.summary() == "teacher-demo pairs need no judge"


class Counted(StageResult):
    rows: int


def test_a_new_stage_is_one_record_run_in_one_event_loop_with_one_client(tmp_path: Path) -> None:
    """run_stage: one event loop, one policy client (closed at the end), the result's fields in
    the manifest beside the envelope, and nothing run again once the manifest exists."""
    config, layout = layout_of(tmp_path)
    seen: dict[str, object] = {}
    runs = []

    async def run(ctx: StageContext) -> Counted:
        runs.append(asyncio.get_running_loop())
        seen["client"] = ctx.policy
        assert ctx.policy is seen["client"]  # one client per stage execution
        task = ctx.progress.task("rows", 2)
        task.advance(2)
        task.close()
        write_jsonl_atomic(ctx.file("count"), [{"i": 0}, {"i": 1}])
        return Counted(rows=2, note="extra fields are kept")

    stage = Stage(name="count", run=run, queue="generate", result=Counted, description="count rows")
    events: list[ProgressEvent] = []
    ctx = StageContext(config, layout, 1, Progress(events.append), policy_url="http://127.0.0.1:9")
    manifest = run_stage(ctx, stage)
    assert len(runs) == 1 and runs[0].is_closed()
    assert seen["client"].closed  # type: ignore[attr-defined]
    assert manifest["rows"] == 2 and manifest["note"] == "extra fields are kept"
    assert manifest["stage"] == "count" and manifest["iteration"] == 1 and manifest["run"] == "r"
    assert set(manifest["outputs"]) == {"count.jsonl"}
    written = read_manifest(layout.stage_manifest(1, "count"))
    assert written is not None and {k: v for k, v in written.items() if k != "written_at"} == manifest
    assert stage.read_result(layout, 1) == Counted(rows=2, note="extra fields are kept")
    assert events[-1].finished and events[-1].done == 2
    # done: returned as it is, nothing runs
    assert run_stage(StageContext(config, layout, 1), stage) == written and len(runs) == 1


def test_a_stage_error_names_the_stage_and_writes_no_manifest(tmp_path: Path) -> None:
    config, layout = layout_of(tmp_path)

    async def run(ctx: StageContext) -> Counted:
        raise InputError("prompts.jsonl:3: field 'prompt' is missing")

    stage = Stage(name="bad", run=run, queue="judge", result=Counted)
    with pytest.raises(StageError, match=r"bad.*prompts.jsonl:3: field 'prompt'"):
        run_stage(StageContext(config, layout, 1), stage)
    assert not layout.stage_manifest(1, "bad").exists()
