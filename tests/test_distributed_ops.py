"""Operating the distributed mode: what the API says about stage jobs in RQ's registries, lost
workers, attempts and logs (real Redis; jobs are put in the states a worker would leave them)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from rq.job import Job, JobStatus

from selfreward.api.coordinator.status import iteration_detail
from selfreward.config import build_config
from selfreward.drivers.rq import enqueue_iteration
from selfreward.drivers.state import RunStore
from selfreward.storage import load_jsonl, read_manifest
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


def test_attempts_are_numbered_closed_and_a_silent_one_is_lost(redis_conn, tmp_path, tiny_model_dir) -> None:
    store = _store_run(redis_conn, tmp_path, tiny_model_dir)
    assert store.start_attempt("ops", 1, "judgments", job_id="j1", worker="w1") == 1
    # the worker of attempt 1 vanished without a word; attempt 2 starts
    assert store.start_attempt("ops", 1, "judgments", job_id="j1", worker="w2") == 2
    ended = store.end_attempt("ops", 1, "judgments", job_id="j1", outcome="failed", error="boom")
    assert ended is not None and ended["attempt"] == 2 and ended["seconds"] >= 0
    assert store.start_attempt("ops", 1, "judgments", job_id="j2", worker="w2") == 3
    store.end_attempt("ops", 1, "judgments", job_id="j2", outcome="done")
    got = store.attempts("ops", 1, "judgments")
    assert [(a["attempt"], a["worker"], a["outcome"]) for a in got] == [
        (1, "w1", "lost"),
        (2, "w2", "failed"),
        (3, "w2", "done"),
    ]
    assert got[1]["error"] == "boom" and got[2]["ended_at"] >= got[2]["started_at"]
    assert store.end_attempt("ops", 1, "judgments", job_id="j2", outcome="done") is None  # closed
    store.delete_run("ops")
    assert store.attempts("ops", 1, "judgments") == []


def test_a_stage_log_holds_the_attempts_output_without_one_line_per_request(tmp_path: Path) -> None:
    import logging
    import sys

    from selfreward.drivers.stage_log import attempt_logs, capture, read_log

    path = tmp_path / "logs" / "iter-1" / "judgments.2.log"
    with capture(path):
        logging.getLogger("selfreward.stages").info("judged 5 of 8")
        logging.getLogger("httpx").info('HTTP Request: POST http://127.0.0.1:1/v1/completions "200 OK"')
        logging.getLogger("httpx").warning("connection reset, retrying")
        print("a line on stdout")
        print("a warning on stderr", file=sys.stderr)
    logging.getLogger("selfreward.stages").info("after the attempt")
    print("after", file=sys.stderr)
    text = read_log(path)
    assert "judged 5 of 8" in text and "connection reset" in text and "a line on stdout" in text
    assert "a warning on stderr" in text
    assert "HTTP Request" not in text and "after the attempt" not in text and "after\n" not in text
    with pytest.raises(ValueError), capture(path):
        raise ValueError("bad record 3")
    assert "ValueError: bad record 3" in read_log(path, tail=3)
    assert read_log(path, tail=1).count("\n") == 1
    (path.parent / "judgments.1.log").write_text("first\n")
    (path.parent / "judgments.x.log").write_text("not an attempt\n")
    assert list(attempt_logs(path.parent, "judgments")) == [1, 2]


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.timeout(900)
def test_failed_stage_resume_killed_horse_and_lost_worker_lose_nothing(
    tmp_path: Path, redis_url: str, redis_conn, tiny_model_dir: Path, policy_server
) -> None:
    """One iteration through everything that goes wrong: bad input fails a stage at once, a
    resume continues at it; a SIGKILLed work-horse (candidates) is retried by its worker; a
    SIGKILLed worker (judgments) takes its work-horse and scheduler child with it, the API says
    worker_lost (name, last heartbeat), a new worker takes the scheduler over and retries the
    stage within 90 s. Nothing is lost or duplicated; every attempt is listed with its log; the
    iteration shows waiting_for_setup (not running) while the set-up runs; metrics count jobs by
    state and workers per queue; the worker that ends the iteration writes the HTML report."""
    from test_coordinator_api import cluster, deployment, horse_of, run_body, wait_records
    from typer.testing import CliRunner

    from selfreward.cli.main import app

    prompts = tmp_path / "prompts.jsonl"
    body = run_body(
        "r2",
        tiny_model_dir,
        policy_server.url,
        prompts={"source": "file", "file": str(prompts), "num_prompts": 40},
        candidates={"n": 3, "max_tokens": 48},
        judge={"concurrency": 1},
        services={"concurrency": 1},
    )
    run_dir = tmp_path / "artifacts" / "runs" / "r2"
    env = deployment(policy_server.url, tiny_model_dir, tmp_path)
    with cluster(tmp_path, redis_url, env) as c, c.client() as api:
        assert api.post("/runs", json=body).status_code == 201
        assert api.post("/runs/r2/iterations").status_code == 202
        assert api.get("/runs/r2/iterations/1").json()["status"] == "queued"
        worker = c.start_worker(1)
        # the set-up runs first: the iteration waits for it, it is not running yet
        seen: set[tuple[str, str]] = set()
        deadline = time.monotonic() + 300
        while (status := api.get("/runs/r2/iterations/1").json()["status"]) != "failed":
            seen.add((api.get("/runs/r2/iterations/0").json()["status"], status))
            assert time.monotonic() < deadline, seen
            time.sleep(0.5)
        during_setup = {status for setup, status in seen if setup != "done"}
        assert during_setup <= {"queued", "waiting_for_setup"} and "waiting_for_setup" in during_setup, seen
        # the prompt file does not exist: bad input fails the stage at once (no retries)
        failed = c.wait_iteration("r2", 1, ("failed",), 300)
        assert failed["failed_stage"] == "prompts" and "prompts.jsonl" in failed["error"]
        assert [s["state"] for s in failed["stages"]][:2] == ["failed", "blocked"]
        # fix the cause, resume: it continues at the failed stage
        prompts.write_text(
            "".join(
                json.dumps({"prompt": f"Write a sentence about topic number {i}."}) + "\n" for i in range(40)
            )
        )
        assert api.post("/runs/r2/iterations/1/resume").status_code == 202
        candidates = run_dir / "iter-1" / "candidates.jsonl"
        wait_records(candidates, 6)
        horse_of(worker).kill()  # SIGKILL the process running the candidates stage
        assert read_manifest(run_dir / "iter-1" / "candidates.manifest.json") is None
        written = {r["id"]: r for r in load_jsonl(candidates)}
        assert 0 < len(written) < 120
        judgments = run_dir / "iter-1" / "judgments.jsonl"
        wait_records(judgments, 6, 300)
        # and now the whole worker running the judgments stage: its children die with it
        children = _children(worker.pid)
        assert len(children) >= 2, children  # the work-horse and RQ's scheduler
        os.kill(worker.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], f"children outlived their worker: {alive}"
        assert read_manifest(run_dir / "iter-1" / "judgments.manifest.json") is None
        judged_before = {r["id"]: r for r in load_jsonl(judgments)}

        def judgments_stage() -> dict[str, Any]:
            detail = api.get("/runs/r2/iterations/1").json()
            return detail | {"stage": {s["stage"]: s for s in detail["stages"]}["judgments"]}

        while (d := judgments_stage())["stage"]["state"] != "worker_lost":
            assert time.monotonic() - killed_at < 60, d["stage"]
            time.sleep(0.5)
        assert d["status"] == "worker_lost"
        assert d["stage"]["worker"].startswith("w1-") and d["stage"]["last_heartbeat"] is not None
        lost_after = time.monotonic() - killed_at
        c.start_worker(2)
        while True:
            attempts = judgments_stage()["stage"].get("attempts", [])
            if len(attempts) >= 2 and attempts[-1]["worker"].startswith("w2-"):
                break
            assert time.monotonic() - killed_at < 90, attempts
            time.sleep(0.5)
        retried_after = time.monotonic() - killed_at
        print(
            f"worker loss: shown as worker_lost after {lost_after:.1f} s, retried after {retried_after:.1f} s"
        )
        (tmp_path / "recovery.txt").write_text(f"{lost_after:.1f} {retried_after:.1f}\n")
        detail = c.wait_iteration("r2", 1, ("done", "failed"), 600)
        assert detail["status"] == "done", detail
        metrics = api.get("/metrics").text
        log1 = api.get("/runs/r2/iterations/1/stages/judgments/log", params={"attempt": 1})
        log2 = api.get("/runs/r2/iterations/1/stages/judgments/log")
        tail = api.get("/runs/r2/iterations/1/stages/judgments/log", params={"tail": 1})
        missing = api.get("/runs/r2/iterations/1/stages/judgments/log", params={"attempt": 9})
        unknown = api.get("/runs/r2/iterations/1/stages/..%2F..%2Fconfig/log")
        anonymous = httpx.get(f"{c.url}/runs/r2/iterations/1/stages/judgments/log")
    # retried, resumed, nothing lost or duplicated
    cands = load_jsonl(candidates)
    assert len(cands) == 120 and len({r["id"] for r in cands}) == 120
    assert all({r["id"]: r for r in cands}[k] == v for k, v in written.items())
    judged = load_jsonl(judgments)
    assert len(judged) == 120 and len({r["id"] for r in judged}) == 120
    assert all({r["id"]: r for r in judged}[k] == v for k, v in judged_before.items())
    states = {s["stage"]: s for s in detail["stages"]}
    assert states["candidates"]["retries_left"] < 3 and states["judgments"]["retries_left"] < 3
    # every attempt, with its worker and outcome
    outcomes = {s: [a["outcome"] for a in st.get("attempts", [])] for s, st in states.items()}
    assert outcomes["prompts"] == ["failed", "done"]
    assert outcomes["candidates"] == ["failed", "done"]  # its horse was killed
    assert outcomes["judgments"] == ["worker_lost", "done"]
    assert all(o == ["done"] for s, o in outcomes.items() if s not in ("prompts", "candidates", "judgments"))
    assert "prompts.jsonl: file not found" in states["prompts"]["attempts"][0]["error"]
    assert log1.status_code == 200 and "judgments (iter-1), attempt 1" in log1.text
    assert log2.status_code == 200 and "attempt 2" in log2.text and "judgments done in" in log2.text
    assert "HTTP Request" not in log2.text
    assert tail.status_code == 200 and tail.text.count("\n") <= 1
    assert missing.status_code == 404 and unknown.status_code == 404 and anonymous.status_code == 401
    manifest = read_manifest(run_dir / "iter-1" / "judgments.manifest.json")
    assert manifest is not None and manifest["seconds_total"] > manifest["seconds"]
    for state in ("queued", "deferred", "scheduled", "started"):
        assert f'selfreward_queue_length{{queue="judge",state="{state}"}}' in metrics
    assert 'selfreward_workers{queue="generate"} 1.0' in metrics
    assert (run_dir / "report.html").is_file()
    # the CLI reads the same logs
    root = str(tmp_path / "artifacts")
    listed = CliRunner().invoke(
        app, ["logs", "r2", "1", "judgments", "--root", root, "--list"], env={"COLUMNS": "400"}
    )
    assert listed.exit_code == 0 and "judgments.2.log" in listed.output, listed.output
    first = CliRunner().invoke(app, ["logs", "r2", "1", "prompts", "--root", root, "--attempt", "1"])
    assert first.exit_code == 0 and "InputError" in first.output, first.output
    none = CliRunner().invoke(app, ["logs", "r2", "1", "judgments", "--root", root, "--attempt", "7"])
    assert none.exit_code != 0 and "attempts: 1, 2" in none.output


@pytest.mark.timeout(900)
def test_a_sharded_judgments_stage_loses_nothing_when_a_worker_is_killed(
    tmp_path: Path, redis_url: str, redis_conn, tiny_model_dir: Path, policy_server
) -> None:
    """services.judge_shards 3: the judgments stage runs as 3 shard jobs on the judge queue taken
    by 2 workers in parallel, then its own job merges them. A worker SIGKILLed mid-shard: its
    shard is shown worker_lost and retried, resuming from its shard file; the merged judgments
    hold every candidate exactly once in the candidates' order, the killed shard's records as
    they were; the shard files are gone; the stage's progress is the sum of its shards'."""
    from test_coordinator_api import cluster, deployment, run_body

    from selfreward.judging.files import read_judge_inputs
    from selfreward.shards import assign, shard_path

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"Name a thing about topic {i}."}) + "\n" for i in range(60))
    )
    body = run_body(
        "sh",
        tiny_model_dir,
        policy_server.url,
        prompts={"source": "file", "file": str(prompts), "num_prompts": 60},
        candidates={"n": 2, "max_tokens": 16},
        judge={"concurrency": 1, "mode": "sample", "samples": 2, "max_tokens": 16},
        services={"judge_shards": 3},
    )
    run_dir = tmp_path / "artifacts" / "runs" / "sh"
    judgments = run_dir / "iter-1" / "judgments.jsonl"
    env = deployment(policy_server.url, tiny_model_dir, tmp_path)
    with cluster(tmp_path, redis_url, env) as c, c.client() as api:
        assert api.post("/runs", json=body).status_code == 201
        jobs = api.post("/runs/sh/iterations").json()["jobs"]
        assert {"1:judgments#0/3", "1:judgments#1/3", "1:judgments#2/3", "1:judgments"} <= set(jobs)
        w1, _w2 = c.start_worker(1), c.start_worker(2)

        def stage() -> dict[str, Any]:
            detail = api.get("/runs/sh/iterations/1").json()
            return {s["stage"]: s for s in detail["stages"]}["judgments"]

        # wait until w1 runs a shard that has written some of its records, then kill w1
        deadline = time.monotonic() + 400
        while True:
            s = stage()
            mine = [
                x
                for x in s.get("shards", [])
                if x.get("state") == "running" and x.get("worker", "").startswith("w1-")
            ]
            if mine:
                i = int(mine[0]["shard"].split("#")[1].split("/")[0])
                path = shard_path(judgments, i, 3)
                if path.is_file() and path.read_bytes().count(b"\n") >= 2:
                    break
            assert time.monotonic() < deadline, s
            time.sleep(0.1)
        os.kill(w1.pid, signal.SIGKILL)
        killed = mine[0]["shard"]
        assert s["state"] == "running" and s["progress"]["shards"] == 3
        parts = [x.get("progress") or {} for x in s["shards"]]
        assert s["progress"]["done"] == sum(p.get("done") or 0 for p in parts)
        assert s["progress"]["total"] == (sum(p.get("total") or 0 for p in parts) or None)
        before = {r["id"]: r for r in load_jsonl(shard_path(judgments, i, 3))}
        assert before and read_manifest(run_dir / "iter-1" / "judgments.manifest.json") is None
        deadline = time.monotonic() + 120
        while (x := {y["shard"]: y for y in stage().get("shards", [])}[killed])["state"] != "worker_lost":
            assert time.monotonic() < deadline, x
            time.sleep(0.5)
        deadline = time.monotonic() + 400
        while read_manifest(run_dir / "iter-1" / "judgments.manifest.json") is None:
            assert time.monotonic() < deadline, stage()
            time.sleep(1)
        s = stage()
        assert api.post("/runs/sh/cancel").status_code in (200, 202)
    cands = load_jsonl(run_dir / "iter-1" / "candidates.jsonl")
    judged = load_jsonl(judgments)
    assert [r["id"] for r in judged] == [r["id"] for r in cands]  # each once, the candidates' order
    by_id = {r["id"]: r for r in judged}
    assert all(by_id[k] == v for k, v in before.items())  # the killed shard's records kept
    split = assign((x.prompt_id for x in read_judge_inputs(run_dir / "iter-1" / "candidates.jsonl")), 3)
    assert all(split[by_id[k]["prompt_id"]] == i for k in before)
    assert not any(shard_path(judgments, j, 3).exists() for j in range(3))
    manifest = read_manifest(run_dir / "iter-1" / "judgments.manifest.json")
    assert manifest["from_shards"] == {"shards": 3, "records": len(cands)} and manifest["judged"] == len(
        cands
    )
    shards = {x["shard"]: x for x in s["shards"]}
    assert [a["outcome"] for a in shards[killed]["attempts"]] == ["worker_lost", "done"]
    assert all([a["outcome"] for a in x["attempts"]] == ["done"] for k, x in shards.items() if k != killed)
    # two workers judged in parallel: w2's shard ran while w1's did
    spans = [(a["started_at"], a["ended_at"], a["worker"]) for x in shards.values() for a in x["attempts"]]
    first = next(sp for sp in spans if sp[2].startswith("w1-"))
    assert any(sp[2].startswith("w2-") and sp[0] < first[1] and first[0] < sp[1] for sp in spans), spans
    logs = run_dir / "logs" / "iter-1"
    assert (logs / f"judgments.shard-{i}-of-3.2.log").is_file()
