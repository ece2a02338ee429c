"""Operating the distributed mode: what the API says about stage jobs in RQ's registries, lost
workers, attempts and logs (real Redis; jobs are put in the states a worker would leave them)."""

from __future__ import annotations

from pathlib import Path

from rq.job import Job, JobStatus

from selfreward.api.coordinator.status import iteration_detail
from selfreward.config import build_config
from selfreward.drivers.rq import enqueue_iteration
from selfreward.drivers.state import RunStore
from selfreward.testing.tiny_run import tiny_run_config


def _store_run(redis_conn, tmp_path: Path, tiny_model_dir: Path, name: str = "ops") -> RunStore:
    body = tiny_run_config(name, tiny_model_dir, "http://127.0.0.1:9", tmp_path, seed=1)
    body["artifact_root"] = str(tmp_path / "artifacts")
    store = RunStore(redis_conn)
    store.create_run(build_config(body, environ={}))
    return store


def test_a_stage_the_stored_state_names_failed_shows_failed_before_rq_moves_its_job(
    redis_conn, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The failure callback runs before RQ moves the job to its failed registry: in that window
    the stage is shown failed (not running) and the stages after it blocked."""
    store = _store_run(redis_conn, tmp_path, tiny_model_dir)
    state = enqueue_iteration(redis_conn, store, "ops", 1)
    first_key = next(k for k in state.jobs if k.startswith("1:"))
    job = Job.fetch(state.jobs[first_key], connection=redis_conn)
    job.set_status(JobStatus.STARTED)
    stage = first_key.split(":", 1)[1]
    store.update_iteration("ops", 1, status="failed", failed_stage=stage, error="InputError: no file")
    detail = iteration_detail(store, redis_conn, "ops", 1)
    assert detail["status"] == "failed" and detail["failed_stage"] == stage
    states = {s["stage"]: s for s in detail["stages"]}
    assert states[stage]["state"] == "failed" and states[stage]["error"] == "InputError: no file"
    assert [s["state"] for s in detail["stages"]][1:] == ["blocked"] * (len(detail["stages"]) - 1)
