"""The RQ driver: stage jobs on a real Redis with a real worker, against the real policy server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis

from selfreward.config import build_config
from selfreward.drivers.rq import enqueue_stage, redis_url_of
from selfreward.drivers.state import RunStore
from selfreward.schemas import CandidateRecord, candidate_id
from selfreward.stages.plan import stage_named
from selfreward.storage import RunLayout, load_jsonl, write_jsonl_atomic, write_manifest
from selfreward.testing.tiny_run import tiny_run_config


def test_redis_url_of_a_connection() -> None:
    for url in ("redis://127.0.0.1:6390/3", "redis://:p%40ss@cache.internal:6379/0", "redis://u:pw@h:1/2"):
        kwargs = redis.Redis.from_url(url).connection_pool.connection_kwargs
        again = redis.Redis.from_url(
            redis_url_of(redis.Redis.from_url(url))
        ).connection_pool.connection_kwargs
        for key in ("host", "port", "db", "password", "username"):
            assert again.get(key) == kwargs.get(key), (url, key)


def test_in_stage_judges_cache_verdicts_in_the_workers_redis(
    tmp_path: Path, tiny_model_dir: Path, policy_server: Any, redis_url: str, redis_conn: Any
) -> None:
    """A judgments stage run by a worker judges in-process (no judge service) with the Redis the
    worker runs on as its verdict cache; a job enqueued by the 0.1 path still runs."""
    from rq import Queue, SimpleWorker

    data = tiny_run_config("rq", tiny_model_dir, policy_server.url, tmp_path, artifact_root=str(tmp_path))
    config = build_config(data, environ={})
    RunStore(redis_conn).create_run(config)
    layout = RunLayout(config.artifact_root, config.name)
    # set-up done, M1 published as the base model itself (the judge is policy:self = "tiny")
    write_manifest(
        layout.stage_manifest(0, "prepare"),
        {
            "base_model_dir": str(tiny_model_dir),
            "base_served_name": "tiny",
            "seed_dir": "",
            "seed_counts": {},
        },
    )
    write_manifest(layout.stage_manifest(0, "publish"), {"model": "m1", "served_name": "tiny"})
    prompts = {"p1": "Name a color.", "p2": "Say hello."}
    rows = [
        CandidateRecord(
            id=candidate_id(pid, i), prompt_id=pid, prompt=text, index=i, text=answer, model="tiny"
        ).model_dump()
        for pid, text in prompts.items()
        for i, answer in enumerate(["Blue.", "Hello there, friend."])
    ]
    write_jsonl_atomic(layout.stage_file(1, "candidates"), rows)
    assert not redis_conn.keys("selfreward:judge:v1:*")

    job = enqueue_stage(redis_conn, config.name, 1, 1, stage_named("judgments", 1))
    SimpleWorker([Queue("judge", connection=redis_conn)], connection=redis_conn).work(burst=True)
    assert job.get_status(refresh=True) == "finished", job.latest_result().exc_string
    judgments = load_jsonl(layout.stage_file(1, "judgments"))
    assert len(judgments) == 4 and {j["judge"] for j in judgments} == {"policy:tiny"}
    # one logprob verdict per candidate, cached in the worker's Redis
    assert len(redis_conn.keys("selfreward:judge:v1:*")) == 4

    # the 0.1 job path (selfreward.services.coordinator.jobs) still runs a stage
    old = Queue("judge", connection=redis_conn).enqueue(
        "selfreward.services.coordinator.jobs.run_stage_job",
        config.name,
        1,
        1,
        "pairs",
        meta={"run": config.name, "t": 1, "stage_t": 1, "stage": "pairs"},
    )
    SimpleWorker([Queue("judge", connection=redis_conn)], connection=redis_conn).work(burst=True)
    status = old.get_status(refresh=True)
    assert status == "finished" or "no preference pair survived" in old.latest_result().exc_string
