"""The coordinator against hostile and broken clients: what a posted run may name (the trust
model), protected reads, bounded input, infinities, long names, Redis going away, deleting runs.
Real Redis; the app in-process (its ASGI interface), as uvicorn serves it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from fastapi.testclient import TestClient

from selfreward.api.coordinator.app import MAX_BODY_BYTES, create_app
from selfreward.testing.servers import free_port

TOKEN = "hardening-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def env_for(root: Path, **more: str) -> dict[str, str]:
    return {
        "SELFREWARD_ARTIFACT_ROOT": str(root / "artifacts"),
        "SELFREWARD_SERVICES__POLICY_URL": "http://policy:8000",
        "SELFREWARD_SERVICES__JUDGE_URL": "http://judge:8100",
        "SELFREWARD_ALLOWED_PATHS": str(root / "shipped"),
        **more,
    }


@contextmanager
def coordinator(redis_url: str, root: Path, **env: str) -> Iterator[TestClient]:
    app = create_app(redis_url=redis_url, api_token=TOKEN, environ=env_for(root, **env))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def stored_runs(conn: Any) -> list[bytes]:
    return conn.zrange("selfreward:runs", 0, -1)


def fields(r: Any) -> set[str]:
    assert r.status_code == 422, r.text
    return {e["field"] for e in r.json()["detail"]}


# ---------------------------------------------------------------- 1. secrets and files


def test_a_posted_run_names_only_what_the_deployment_allows(
    redis_url: str, redis_conn: Any, tmp_path: Path
) -> None:
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "judge.txt").write_text("Q: {instruction}\nA: {response}\nScore: N")
    secret = tmp_path / "secret.key"
    secret.write_text("deployment-secret")
    (shipped / "link.txt").symlink_to(secret)  # inside the allowed folder, pointing outside
    refused = {
        "teacher.backend": {
            "variant": "teacher-reward",
            "teacher": {"backend": "openai:http://evil.test/v1#m"},
        },
        "data.eft_judge": {"data": {"eft_targets": "judge-filtered", "eft_judge": "gemini:x"}},
        "eval.judge": {"eval": {"judge": "openai:http://evil.test/v1#m"}},
        "teacher.gemini_base_url": {"teacher": {"gemini_base_url": "http://evil.test"}},
        "teacher.api_key_env": {"teacher": {"api_key_env": "SELFREWARD_API_TOKEN"}},
        "teacher.api_key_file": {"teacher": {"api_key_file": str(secret)}},
        "services.redis_url": {"services": {"redis_url": "redis://evil.test:6379/0"}},
        # publish would load adapters on, and write links into, places the deployment did not choose
        "services.policy_pool": {"services": {"policy_pool": "evil.test:8000"}},
        "services.policy_lora_dir": {"services": {"policy_lora_dir": str(tmp_path / "elsewhere")}},
        "judge.template": {"judge": {"template": str(secret)}},
        "judge.compare_template": {"judge": {"compare_template": str(shipped / "link.txt")}},
        "eval.prompts": {"eval": {"prompts": f"alpaca_eval:{secret}"}},
        "eval.judge_bench.0.set": {"eval": {"judge_bench": [{"set": str(secret)}]}},
        "prompts.file": {"prompts": {"source": "file", "file": "relative/prompts.jsonl"}},
        "model.chat_template": {"model": {"chat_template": "/etc/hostname"}},
        "data.source": {"data": {"source": "/etc/passwd"}},
        "model.base": {"model": {"base": "/etc"}},
        "training.accelerate_config": {"training": {"accelerate_config": str(secret)}},
    }
    with coordinator(redis_url, tmp_path) as api:
        for field, body in refused.items():
            r = api.post("/runs", json={"name": "hostile", **body}, headers=AUTH)
            assert field in fields(r), (field, r.text)
        assert stored_runs(redis_conn) == [] and not (tmp_path / "artifacts").exists()
        # all of them at once: one entry per field
        merged: dict[str, Any] = {"name": "hostile"}
        for body in refused.values():
            for section, values in body.items():
                if isinstance(values, dict):
                    merged.setdefault(section, {}).update(values)
        assert len(fields(api.post("/runs", json=merged, headers=AUTH))) >= 12
        # what the deployment allows is accepted: its backends, its files, the built-ins; the
        # fields it sets itself keep its values (a posted service URL or root is replaced, and said)
        ok = {
            "name": "fine",
            "artifact_root": "somewhere/else",
            "judge": {"template": str(shipped / "judge.txt")},
            "eval": {"judge": "policy:m0", "judge_bench": [{"set": "hf:allenai/reward-bench:filtered"}]},
            "services": {"policy_url": "http://policy:8000", "judge_url": "http://evil.test:8100"},
        }
        r = api.post("/runs", json=ok, headers=AUTH)
        assert r.status_code == 201, r.text
        assert r.json()["replaced"] == ["artifact_root", "services.judge_url"]
        saved = r.json()["config"]
        assert saved["services"]["judge_url"] == "http://judge:8100"
        assert saved["artifact_root"] == str(tmp_path / "artifacts")
    allowed = env_for(tmp_path, SELFREWARD_ALLOWED_BACKENDS="gemini:*,openai:http://teacher:9000/v1#*")
    app = create_app(redis_url=redis_url, api_token=TOKEN, environ=allowed)
    with TestClient(app) as api:
        body = {
            "name": "teach",
            "variant": "teacher-reward",
            "teacher": {"backend": "openai:http://teacher:9000/v1#big"},
        }
        assert api.post("/runs", json=body, headers=AUTH).status_code == 201
        body = {"name": "gem", "variant": "teacher-demo", "teacher": {"backend": "gemini:gemini-2.0-flash"}}
        assert api.post("/runs", json=body, headers=AUTH).status_code == 201


# ---------------------------------------------------------------- 3. reads and tracebacks


def test_reads_need_the_token_unless_opened(redis_url: str, redis_conn: Any, tmp_path: Path) -> None:
    with coordinator(redis_url, tmp_path) as api:
        assert api.post("/runs", json={"name": "r"}, headers=AUTH).status_code == 201
        for path in ("/runs", "/runs/r", "/runs/r/iterations/0"):
            assert api.get(path).status_code == 401, path
            assert api.get(path, headers=AUTH).status_code == 200, path
        assert api.get("/healthz").status_code == 200 and api.get("/metrics").status_code == 200
        assert api.get("/openapi.json").status_code == 200
    with coordinator(redis_url, tmp_path, SELFREWARD_PUBLIC_READS="1") as api:
        assert api.get("/runs/r").status_code == 200
        assert api.post("/runs", json={"name": "r2"}).status_code == 401  # writes still need it


def test_a_failed_stage_reports_its_error_without_a_traceback(
    redis_url: str, redis_conn: Any, tmp_path: Path
) -> None:
    from rq import Queue, SimpleWorker

    from selfreward.drivers.rq import enqueue_stage
    from selfreward.stages.plan import stage_named

    with coordinator(redis_url, tmp_path) as api:
        assert api.post("/runs", json={"name": "broken"}, headers=AUTH).status_code == 201
        # the pairs stage of iteration 1 without candidates: an input error, not retried
        enqueue_stage(redis_conn, "broken", 1, 1, stage_named("pairs", 1))
        SimpleWorker([Queue("judge", connection=redis_conn)], connection=redis_conn).work(burst=True)
        detail = api.get("/runs/broken/iterations/1", headers=AUTH).json()
    assert detail["status"] == "failed" and detail["failed_stage"] == "pairs"
    assert "candidates.jsonl" in detail["error"]
    text = json.dumps(detail)
    assert "Traceback" not in text and 'File "' not in text and '.py\\", line' not in text


# ---------------------------------------------------------------- 4-6. bad values, names, sizes


def test_infinities_and_nan_are_refused_and_a_bad_record_never_breaks_the_list(
    redis_url: str, redis_conn: Any, tmp_path: Path
) -> None:
    with coordinator(redis_url, tmp_path) as api:
        for raw in (
            '{"name": "x", "judge": {"timeout_s": 1e400}}',
            '{"name": "x", "judge": {"timeout_s": NaN}}',
        ):
            r = api.post("/runs", content=raw, headers={**AUTH, "content-type": "application/json"})
            assert fields(r) == {"judge.timeout_s"}
        assert stored_runs(redis_conn) == []
        assert api.get("/runs", headers=AUTH).json() == []
        assert api.post("/runs", json={"name": "good"}, headers=AUTH).status_code == 201
        # a record an older version stored, unreadable today
        redis_conn.hset("selfreward:run:legacy", mapping={"config": "{not json", "created_at": 1})
        redis_conn.zadd("selfreward:runs", {"legacy": 1})
        r = api.get("/runs", headers=AUTH)
        assert r.status_code == 200
        by_name = {x["run"]: x for x in r.json()}
        assert by_name["legacy"]["error"].startswith("unreadable") and "variant" in by_name["good"]


def test_long_names_and_big_values_are_refused_before_anything_is_stored(
    redis_url: str, redis_conn: Any, tmp_path: Path
) -> None:
    with coordinator(redis_url, tmp_path) as api:
        assert fields(api.post("/runs", json={"name": "n" * 300}, headers=AUTH)) == {"name"}
        assert stored_runs(redis_conn) == [] and not (tmp_path / "artifacts" / "runs").exists()
        # a body over 1 MiB: 413 before it is parsed
        huge = {"name": "big", "teacher": {"backend": "gemini:" + "x" * (20 << 20)}}
        r = api.post("/runs", json=huge, headers=AUTH)
        assert r.status_code == 413 and "larger than" in r.json()["detail"]
        # under the body limit, a long value is refused and echoed only in part
        long = {"name": "long", "teacher": {"backend": "gemini:" + "y" * 500_000}, "surplus": "z" * 500_000}
        r = api.post("/runs", json=long, headers=AUTH)
        assert fields(r) == {"teacher.backend", "surplus"} and len(r.text) < 4000
        assert (
            len(
                json.dumps(
                    api.post(
                        "/runs", json={"name": "l", "data": {"languages": ["en"] * 300}}, headers=AUTH
                    ).json()
                )
            )
            < 4000
        )
        assert stored_runs(redis_conn) == []
    assert MAX_BODY_BYTES == 1 << 20


# ---------------------------------------------------------------- 7. Redis going away


@contextmanager
def own_redis(tmp_path: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    exe = shutil.which("redis-server")
    assert exe, "redis-server is needed"
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    conn = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            conn.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_while_redis_is_down_the_api_answers_503_and_recovers(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    app = create_app(redis_url=url, api_token=TOKEN, environ=env_for(tmp_path))
    with TestClient(app, raise_server_exceptions=False) as api:
        with own_redis(tmp_path, port):
            assert api.post("/runs", json={"name": "r"}, headers=AUTH).status_code == 201
        # Redis is gone
        for method, path, body in (
            ("GET", "/runs", None),
            ("GET", "/runs/r", None),
            ("POST", "/runs", {"name": "s"}),
            ("POST", "/runs/r/iterations", None),
            ("GET", "/healthz", None),
        ):
            r = api.request(method, path, json=body, headers=AUTH)
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert "redis" in r.json()["detail"], path
        with own_redis(tmp_path, port):  # back (empty: the test's Redis keeps nothing)
            started = time.monotonic()
            while api.get("/healthz").status_code != 200:
                assert time.monotonic() - started < 5, "the coordinator did not reconnect"
                time.sleep(0.02)
            assert api.get("/runs", headers=AUTH).status_code == 200


# ---------------------------------------------------------------- 8. deleting a run


def test_delete_a_run_keeping_or_removing_its_artifacts(
    redis_url: str, redis_conn: Any, tmp_path: Path
) -> None:
    from selfreward.drivers.state import IterationState, RunStore

    with coordinator(redis_url, tmp_path) as api:
        for name in ("keep", "drop", "busy"):
            assert api.post("/runs", json={"name": name}, headers=AUTH).status_code == 201
        runs = tmp_path / "artifacts" / "runs"
        assert api.delete("/runs/keep").status_code == 401
        r = api.delete("/runs/keep", headers=AUTH)
        assert r.status_code == 200 and r.json()["artifacts"] == "kept"
        assert (runs / "keep" / "config.yaml").is_file() and api.get(
            "/runs/keep", headers=AUTH
        ).status_code == 404
        assert api.delete("/runs/drop?artifacts=delete", headers=AUTH).json()["artifacts"] == "deleted"
        assert not (runs / "drop").exists()
        RunStore(redis_conn).save_iteration(
            "busy", IterationState(1, "running", {}, None, None, time.time(), None, 0)
        )
        assert api.delete("/runs/busy", headers=AUTH).status_code == 409
        assert api.delete("/runs/nope", headers=AUTH).status_code == 404
        assert [r["run"] for r in api.get("/runs", headers=AUTH).json()] == ["busy"]
        # a kept run's folder is its own again once re-created with the same config
        assert api.post("/runs", json={"name": "keep"}, headers=AUTH).status_code == 201


# ---------------------------------------------------------------- 12-13. the OpenAPI document


def test_the_openapi_document_shows_the_run_config_and_every_error(redis_url: str, tmp_path: Path) -> None:
    with coordinator(redis_url, tmp_path) as api:
        doc = api.get("/openapi.json").json()
    body = doc["paths"]["/runs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/RunConfig"}
    config = doc["components"]["schemas"]["RunConfig"]
    assert {"judge", "teacher", "services"} <= set(config["properties"])
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            codes = set(op["responses"])
            if path not in ("/healthz", "/metrics"):
                assert "401" in codes, (method, path)
            if "{run_id}" in path:
                assert "404" in codes, (method, path)
            if method == "post" and path == "/runs":
                assert {"409", "413", "422", "503"} <= codes
    assert os.environ.get("SELFREWARD_API_TOKEN") != TOKEN  # the test's token is its own


def test_fields_the_deployment_sets_are_its_own_choice(
    redis_url: str, redis_conn: Any, tmp_path: Path
) -> None:
    """A value of the deployment's own overrides is trusted (a model folder it mounts, a teacher it
    picked), while the same value posted by a client is refused."""
    model = tmp_path / "models" / "phi"
    model.mkdir(parents=True)
    body = {"name": "mine", "model": {"base": str(model)}}
    with coordinator(redis_url, tmp_path) as api:
        assert fields(api.post("/runs", json=body, headers=AUTH)) == {"model.base"}
    with coordinator(redis_url, tmp_path, SELFREWARD_MODEL__BASE=str(model)) as api:
        r = api.post("/runs", json={"name": "theirs"}, headers=AUTH)
        assert r.status_code == 201 and r.json()["config"]["model"]["base"] == str(model)
        other = tmp_path / "models" / "other"
        other.mkdir()
        posted = {"name": "other", "model": {"base": str(other)}}
        r = api.post("/runs", json=posted, headers=AUTH)  # the deployment's overrides win over a body
        assert r.status_code == 201 and r.json()["config"]["model"]["base"] == str(model)
