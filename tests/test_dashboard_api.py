"""The dashboard's JSON endpoints under both entry points: `selfreward ui` (a real server on
loopback, over an artifact folder) and the coordinator's /ui (real Redis, its auth rules).
Paging of large files by byte offsets, path confinement, the embedded driver's progress and
error files, the trainer's log history."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dashboard_run import finished_run, reward_model, running_run, write_config, write_progress
from fastapi.testclient import TestClient

from selfreward.api.coordinator.app import create_app
from selfreward.drivers.embedded import run_stage_with_files, stage_error
from selfreward.drivers.state import IterationState, RunStore
from selfreward.errors import InputError, StageError
from selfreward.progress import Progress
from selfreward.stages.stage import Stage, StageContext, StageResult
from selfreward.storage import RunLayout, atomic_write_json, read_manifest, write_jsonl_atomic
from selfreward.testing.servers import background, free_port, wait_http

TOKEN = "dash-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dash") / "artifacts"
    finished_run(root, "demo")
    running_run(root, "live")
    return root


@pytest.fixture(scope="module")
def ui(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`selfreward ui ROOT --port P`, a real server process."""
    port = free_port()
    log = tmp_path_factory.mktemp("ui-log") / "ui.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "selfreward.cli.main", "ui", str(artifacts), "--port", str(port)]
    with background(cmd, log, env) as proc:
        wait_http(f"http://127.0.0.1:{port}/ui/api/info", 60, proc, log)
        yield f"http://127.0.0.1:{port}"


def get(base: str, path: str, **params: Any) -> Any:
    r = httpx.get(base + path, params=params, timeout=30)
    assert r.status_code == 200, (path, r.status_code, r.text)
    return r.json()


def test_pages_and_static_files_are_served_at_stable_urls(ui: str) -> None:
    for path in ("/ui/", "/ui/runs/demo", "/ui/runs/demo/iterations/1", "/ui/runs/demo/iterations/1/data"):
        r = httpx.get(ui + path)
        assert r.status_code == 200 and 'src="/ui/static/app.js' in r.text, path
    for name, kind in (("app.js", "javascript"), ("charts.js", "javascript"), ("app.css", "css")):
        r = httpx.get(f"{ui}/ui/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"] and len(r.text) > 200, name
    assert "http" not in httpx.get(f"{ui}/ui/static/app.css").text  # no CDN, no remote font
    assert httpx.get(f"{ui}/ui/static/..%2Fapp.py").status_code == 404
    assert httpx.get(f"{ui}/ui/static/router.py").status_code == 404
    assert httpx.get(ui + "/", follow_redirects=False).headers["location"] == "/ui/"
    info = get(ui, "/ui/api/info")
    assert info["mode"] == "embedded" and info["writable"] is False


def test_runs_run_and_iteration_of_a_finished_and_a_running_run(ui: str) -> None:
    runs = {r["run"]: r for r in get(ui, "/ui/api/runs")}
    assert set(runs) == {"demo", "live"}
    demo, live = runs["demo"], runs["live"]
    assert demo["status"] == "done" and demo["completed_iterations"] == 2 and demo["variant"] == "self-reward"
    assert demo["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and demo["updated_at"] > 0
    assert live["status"] == "running" and live["completed_iterations"] == 0

    run = get(ui, "/ui/api/runs/demo")
    rows = {r["key"]: r for r in run["config"]}
    assert rows["iterations"] == {"key": "iterations", "value": 2, "default": False}
    assert rows["seed"]["default"] is True and rows["candidates.n"]["value"] == 3
    assert [i["t"] for i in run["timeline"]] == [0, 1, 2]
    assert all(i["status"] == "done" for i in run["timeline"])

    it = get(ui, "/ui/api/runs/live/iterations/1")
    states = {s["stage"]: s["state"] for s in it["stages"]}
    assert states["prompts"] == "done" and states["candidates"] == "running" and states["pairs"] == "pending"
    cand = next(s for s in it["stages"] if s["stage"] == "candidates")
    assert cand["progress"]["done"] == 3 and cand["progress"]["total"] == 12 and cand["progress"]["eta_s"] > 0
    assert it["status"] == "running"
    prompts = next(s for s in it["stages"] if s["stage"] == "prompts")
    assert prompts["seconds"] == 5.0 and prompts["counts"]["count"] == 4
    assert httpx.get(f"{ui}/ui/api/runs/nope").status_code == 404
    assert httpx.get(f"{ui}/ui/api/runs/demo/iterations/9").status_code == 404


def test_metrics_trends_curves_and_wall_time(ui: str) -> None:
    m = get(ui, "/ui/api/runs/demo/metrics")
    assert [t["t"] for t in m["trends"]] == [1, 2]
    one = m["trends"][0]
    assert one["model"] == "m2" and one["baseline"] == "m1" and one["n"] == 8
    assert (
        one["win_rate"] == pytest.approx((6 + 0.5) / 8)
        and one["interval"][0] <= one["win_rate"] <= one["interval"][1]
    )
    assert (
        one["judge_agreement"] == reward_model(1)["pairwise_accuracy"]
        and one["pairs"] == 3
        and one["dropped"] == {"ties": 1}
    )
    assert one["score_shares"]["3"] == 0.3 and one["collapsed"] is False and one["chosen_length"] == 81.0
    assert m["trends"][1]["evidence"] is True and "beats" in m["trends"][1]["summary"]
    curves = {c["model"]: c for c in m["curves"]}
    assert [c["model"] for c in m["curves"]] == ["m1", "m2", "m3"]
    assert curves["m1"]["kind"] == "sft" and [p["step"] for p in curves["m1"]["points"]] == [1, 2, 3, 4, 5]
    assert curves["m2"]["points"][-1]["rewards/margins"] == pytest.approx(0.4)
    assert all("train_runtime" not in p for c in m["curves"] for p in c["points"])
    wall = {(w["t"], w["stage"]): w["seconds"] for w in m["wall"]}
    assert wall[(0, "sft")] == 3.0 and wall[(1, "candidates")] == 2.0 + len("candidates")


def test_data_browser_joins_prompts_candidates_verdicts_and_pairs(ui: str, artifacts: Path) -> None:
    page = get(ui, "/ui/api/runs/demo/iterations/1/data")
    pairs = [json.loads(x) for x in (artifacts / "runs/demo/iter-1/pairs.jsonl").read_text().splitlines()]
    assert [i["prompt_id"] for i in page["items"]] == [p["prompt_id"] for p in pairs]
    first = page["items"][0]
    assert first["pair"]["chosen"] == pairs[0]["chosen"][0]["content"]
    assert first["pair"]["margin"] == pairs[0]["chosen_score"] - pairs[0]["rejected_score"]
    assert [c["index"] for c in first["candidates"]] == [0, 1, 2]
    assert first["candidates"][1]["verdicts"][0]["text"].endswith("Score: 4")
    # prompts view with filters: the tie (no pair), the parse failure, a text search, a margin
    dropped = get(ui, "/ui/api/runs/demo/iterations/1/data", view="prompts", filter="dropped")
    assert [i["prompt_id"] for i in dropped["items"]] == ["it1-p3"] and dropped["items"][0]["pair"] is None
    failures = get(ui, "/ui/api/runs/demo/iterations/1/data", view="prompts", filter="parse_failures")
    assert [i["prompt_id"] for i in failures["items"]] == ["it1-p1"]
    assert failures["items"][0]["candidates"][0]["verdicts"][0]["failure"] == "unparseable"
    found = get(ui, "/ui/api/runs/demo/iterations/1/data", q="POEM about")
    assert [i["prompt_id"] for i in found["items"]] == ["it1-p1"]
    wide = get(ui, "/ui/api/runs/demo/iterations/1/data", min_margin=3.0)
    assert {i["prompt_id"] for i in wide["items"]} == {
        p["prompt_id"] for p in pairs if p["chosen_score"] - p["rejected_score"] >= 3
    }
    # paging: two records a page, continued from next_offset, ends with None
    seen, offset = [], 0
    while offset is not None:
        p = get(ui, "/ui/api/runs/demo/iterations/1/data", limit=2, offset=offset)
        seen += [i["prompt_id"] for i in p["items"]]
        offset = p["next_offset"]
    assert seen == [x["prompt_id"] for x in pairs]
    assert httpx.get(f"{ui}/ui/api/runs/demo/iterations/1/data", params={"offset": 3}).status_code == 400
    # evaluation examples side by side, both orders' verdicts
    ev = get(ui, "/ui/api/runs/demo/iterations/1/eval")
    assert ev["files"] == ["verdicts-m2-vs-m1.jsonl"] and len(ev["items"]) == 8
    e0 = ev["items"][0]
    assert e0["answer_a"] == "m2 says answer 0" and e0["answer_b"] == "m1 says answer 0"
    assert e0["ab"]["winner"] == "A" and e0["ba"]["text"] and e0["instruction"] == "Eval question 0?"


def test_a_50k_line_candidates_file_pages_without_being_read_whole(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    layout = write_config(root, "big", iterations=1)
    path = layout.stage_file(1, "candidates")
    path.parent.mkdir(parents=True)
    with open(path, "w") as fh:
        for i in range(50_000):
            rec = {
                "id": f"p{i // 4}:{i % 4}",
                "prompt_id": f"p{i // 4}",
                "prompt": "q" * 50,
                "index": i % 4,
                "text": f"answer number {i} " + "x" * 300,
                "model": "m1",
            }
            fh.write(json.dumps(rec) + "\n")
    size = path.stat().st_size
    assert size > 15_000_000
    with TestClient(
        __import__("selfreward.dashboard.app", fromlist=["create_app"]).create_app(root)
    ) as client:
        started = time.perf_counter()
        r = client.get("/ui/api/runs/big/iterations/1/files/candidates.jsonl", params={"limit": 50})
        first = time.perf_counter() - started
        assert r.status_code == 200
        page = r.json()
        assert len(page["records"]) == 50 and page["size"] == size
        assert page["bytes_read"] < 50 * 500 and len(r.content) < 60_000 and first < 2.0
        # a page deep in the file: reading starts at the offset
        deep = client.get(
            "/ui/api/runs/big/iterations/1/files/candidates.jsonl",
            params={"offset": page["offsets"][-1] + 0, "limit": 1},
        ).json()
        assert deep["records"][0]["text"].startswith("answer number 49 ")
        offset = size // 2
        with open(path, "rb") as fh:
            fh.seek(offset)
            fh.readline()
            offset = fh.tell()
        mid = client.get(
            "/ui/api/runs/big/iterations/1/files/candidates.jsonl", params={"offset": offset, "limit": 3}
        ).json()
        n = int(mid["records"][0]["text"].split()[2])
        assert 24_000 < n < 26_000 and mid["bytes_read"] < 3 * 500
        assert [int(x["text"].split()[2]) for x in mid["records"]] == [n, n + 1, n + 2]
        # the data browser over the same file: a page of two pairs with their candidates, found
        # by an index of byte offsets (one streaming pass), not by holding the file
        pairs = [
            {"prompt_id": pid, "prompt": [{"role": "user", "content": "q"}],
             "chosen": [{"role": "assistant", "content": f"best of {pid}"}],
             "rejected": [{"role": "assistant", "content": f"worst of {pid}"}], "chosen_score": 5.0, "rejected_score": 1.0}
            for pid in ("p100", "p12000")
        ]  # fmt: skip
        write_jsonl_atomic(layout.stage_file(1, "pairs"), pairs)
        started = time.perf_counter()
        r = client.get("/ui/api/runs/big/iterations/1/data")
        elapsed = time.perf_counter() - started
        assert r.status_code == 200 and len(r.content) < 20_000 and elapsed < 10, (len(r.content), elapsed)
        items = r.json()["items"]
        assert [i["pair"]["chosen"] for i in items] == ["best of p100", "best of p12000"]
        assert [c["text"].split()[2] for c in items[1]["candidates"]] == ["48000", "48001", "48002", "48003"]
        # the last page says so
        last = client.get(
            "/ui/api/runs/big/iterations/1/files/candidates.jsonl", params={"offset": size - 400, "limit": 5}
        )
        assert last.status_code == 400  # not the start of a line
        # search scans from the offset, in bounded chunks
        hit = client.get(
            "/ui/api/runs/big/iterations/1/files/candidates.jsonl",
            params={"q": "answer number 777 ", "limit": 1},
        ).json()
        assert [x["text"].split()[2] for x in hit["records"]] == ["777"] and hit["bytes_read"] < size / 10


def test_no_endpoint_serves_a_file_outside_the_run_folder(artifacts: Path, tmp_path: Path) -> None:
    from selfreward.dashboard.app import create_app as ui_app

    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"secret": "deployment-key"}\n')
    iter_dir = artifacts / "runs" / "demo" / "iter-1"
    (iter_dir / "escape.jsonl").symlink_to(secret)
    (artifacts / "runs" / "demo" / "eval" / "iter-1" / "verdicts-x-vs-y.jsonl").symlink_to(secret)
    outside_run = artifacts.parent / "other"
    outside_run.mkdir()
    (outside_run / "config.yaml").write_text("name: other\n")
    try:
        with TestClient(ui_app(artifacts)) as client:
            base = "/ui/api/runs/demo/iterations/1/files/"
            for name in (
                "escape.jsonl",
                "..%2F..%2Fconfig.yaml",
                "%2Fetc%2Fpasswd",
                "%2E%2E",
                "...jsonl",
                "candidates.json",
            ):
                r = client.get(base + name)
                assert r.status_code == 404, (name, r.text)
                assert "deployment-key" not in r.text and "root:" not in r.text
            r = client.get("/ui/api/runs/demo/iterations/1/eval", params={"file": "verdicts-x-vs-y.jsonl"})
            assert r.status_code == 404 and "deployment-key" not in r.text
            r = client.get("/ui/api/runs/demo/iterations/1/eval", params={"file": "../../../secret.jsonl"})
            assert r.status_code == 404
            for run in ("..%2Fother", "%2E%2E"):
                assert client.get(f"/ui/api/runs/{run}").status_code == 404, run
                assert client.get(f"/ui/api/runs/{run}/iterations/1/data").status_code == 404, run
            assert client.get("/ui/api/runs/demo/iterations/-1/files/candidates.jsonl").status_code == 404
            assert client.get(base + "candidates.jsonl").status_code == 200
    finally:
        (iter_dir / "escape.jsonl").unlink()
        (artifacts / "runs" / "demo" / "eval" / "iter-1" / "verdicts-x-vs-y.jsonl").unlink()


def test_the_coordinator_serves_the_dashboard_with_its_auth_rules(
    redis_url: str, redis_conn: Any, tmp_path: Path
) -> None:
    root = tmp_path / "artifacts"
    layout = finished_run(root, "demo")
    failed = running_run(root, "broken")
    store = RunStore(redis_conn)
    for run in ("demo", "broken"):
        from selfreward.config import load_config

        assert store.create_run(load_config(RunLayout(root, run).config_path))
    failed.stage_progress(1, "candidates").unlink()
    store.save_iteration(
        "broken",
        IterationState(
            1,
            "failed",
            {},
            "stage 'candidates' failed: prompts.jsonl:3: field 'prompt' is empty",
            "candidates",
            time.time() - 60,
            time.time(),
            0,
        ),
    )
    app = create_app(redis_url=redis_url, api_token=TOKEN, environ={})
    with TestClient(app) as api:
        assert api.get("/ui/runs/demo").status_code == 200  # the page shell is open
        assert api.get("/ui/static/app.js").status_code == 200
        assert api.get("/ui/api/info").json() == {
            "mode": "coordinator",
            "writable": True,
            "auth_required": True,
            "version": api.get("/healthz").json()["version"],
        }
        for path in (
            "/ui/api/runs",
            "/ui/api/runs/demo",
            "/ui/api/runs/demo/metrics",
            "/ui/api/runs/demo/iterations/1",
            "/ui/api/runs/demo/iterations/1/data",
        ):
            assert api.get(path).status_code == 401, path
            assert api.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        for path in ("/runs/broken/iterations/1/resume", "/runs/broken/iterations", "/runs/broken/cancel"):
            assert api.post(path).status_code == 401, path
        runs = {r["run"]: r for r in api.get("/ui/api/runs", headers=AUTH).json()}
        assert runs["demo"]["status"] == "done" and runs["demo"]["completed_iterations"] == 2
        assert runs["broken"]["status"] == "failed"
        it = api.get("/ui/api/runs/broken/iterations/1", headers=AUTH).json()
        assert it["status"] == "failed" and it["error"]["record"] == "prompts.jsonl:3"
        states = {s["stage"]: s for s in it["stages"]}
        assert states["prompts"]["state"] == "done" and "iteration" not in states["prompts"]["counts"]
        # the manifest's envelope is not among the counts
        assert not {"written_at", "started_at", "peak_rss_bytes", "seconds"} & set(
            states["prompts"]["counts"]
        )
        assert (
            states["candidates"]["state"] == "failed"
            and states["candidates"]["error"]["stage"] == "candidates"
        )
        run = api.get("/ui/api/runs/demo", headers=AUTH).json()
        assert [i["status"] for i in run["timeline"]] == ["done", "done", "done"]
        assert {r["key"] for r in run["config"]} >= {"iterations", "model.base"}
        data = api.get("/ui/api/runs/demo/iterations/1/data", headers=AUTH).json()
        assert data["items"][0]["pair"]["chosen"].startswith("Answer 1 of m1")
        m = api.get("/ui/api/runs/demo/metrics", headers=AUTH).json()
        assert [c["model"] for c in m["curves"]] == ["m1", "m2", "m3"]
        # resume with the token re-enqueues the failed iteration
        r = api.post("/runs/broken/iterations/1/resume", headers=AUTH)
        assert r.status_code == 202, r.text
        assert store.iteration("broken", 1).attempt == 1 and store.iteration("broken", 1).status != "failed"
    assert read_manifest(layout.stage_manifest(1, "pairs"))["pairs"] == 3
    # reads made public: the JSON opens, the actions still need the token
    app = create_app(redis_url=redis_url, api_token=TOKEN, environ={"SELFREWARD_PUBLIC_READS": "1"})
    with TestClient(app) as api:
        assert (
            api.get("/ui/api/runs").status_code == 200
            and api.get("/ui/api/info").json()["auth_required"] is False
        )
        assert api.post("/runs/demo/cancel").status_code == 401


def test_the_embedded_driver_writes_progress_and_error_files(tmp_path: Path) -> None:
    from selfreward.config import RunConfig

    layout = write_config(tmp_path, "emb", iterations=1)
    config = RunConfig.model_validate({"name": "emb", "artifact_root": str(tmp_path)})
    seen: list[dict[str, Any]] = []

    class Ok(StageResult):
        n: int

    async def ok(ctx: StageContext) -> Ok:
        task = ctx.progress.task("work", 3)
        for _ in range(3):
            task.advance(1)
            seen.append(json.loads(layout.stage_progress(1, "prompts").read_text()))
        task.close()
        return Ok(n=3)

    async def bad(ctx: StageContext) -> Ok:
        ctx.progress.task("work", 10).advance(2)
        raise InputError(f"{layout.stage_file(1, 'prompts')}:7: field 'prompt' must be a string")

    def stage(name: str, run: Any) -> Stage:
        from selfreward.stages.plan import stage_named

        return dataclasses.replace(stage_named(name), run=run, result=Ok)

    ctx = StageContext(config, layout, 1, Progress(), redis_url=None)
    run_stage_with_files(ctx, stage("prompts", ok))
    # written when the task starts, then at most once a second (the three steps take less)
    assert [x["current"]["done"] for x in seen] == [0, 0, 0] and seen[0]["current"]["total"] == 3
    final = json.loads(layout.stage_progress(1, "prompts").read_text())
    assert (
        final["current"]["finished"] is True and final["pid"] == os.getpid() and final["stage"] == "prompts"
    )
    assert read_manifest(layout.stage_manifest(1, "prompts"))["n"] == 3
    ctx = StageContext(config, layout, 1, Progress(), redis_url=None)
    with pytest.raises(StageError):
        run_stage_with_files(ctx, stage("candidates", bad))
    err = json.loads(layout.stage_error(1, "candidates").read_text())
    assert err["stage"] == "candidates" and err["record"].endswith("prompts.jsonl:7")
    assert "must be a string" in err["message"] and err["user_error"] is True
    from selfreward.dashboard.source import ArtifactSource

    it = ArtifactSource(tmp_path).iteration("emb", 1)
    states = {s["stage"]: s for s in it["stages"]}
    assert states["prompts"]["state"] == "done" and states["candidates"]["state"] == "failed"
    assert it["status"] == "failed" and it["error"]["record"].endswith("prompts.jsonl:7")
    # a progress file of a process that is gone: interrupted, not running
    write_progress(layout, 1, "judgments", 1, 5)
    path = layout.stage_progress(1, "judgments")
    atomic_write_json(path, {**json.loads(path.read_text()), "pid": 2**22 + 12345})
    states = {s["stage"]: s["state"] for s in ArtifactSource(tmp_path).iteration("emb", 1)["stages"]}
    assert states["judgments"] == "interrupted"
    assert stage_error("x", 1, ValueError("record 'p:3' is bad"))["record"] == "p:3"


def test_selfreward_ui_refuses_a_folder_without_runs(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from selfreward.cli.main import app

    result = CliRunner().invoke(app, ["ui", str(tmp_path / "nowhere"), "--port", "0"])
    assert result.exit_code == 2 and "no runs/ folder" in result.output
