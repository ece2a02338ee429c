"""The distributed mode through its REST API: a real coordinator (uvicorn, subprocess), real RQ
workers (subprocesses), a real Redis, the real policy service (vLLM on a tiny model)."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from selfreward.storage import load_jsonl, read_manifest
from selfreward.testing.servers import background, free_port, wait_http
from selfreward.testing.tiny_run import tiny_run_config

TOKEN = "s3cret"
# the tiny random judge gives one score to every answer (a collapse): the test's later
# iterations start anyway
ON_COLLAPSE = {"continue_on_collapse": True}
SELFREWARD = [sys.executable, "-m", "selfreward.cli.main"]
QUEUES = ["--queue", "generate", "--queue", "judge", "--queue", "train", "--queue", "evaluate"]


def run_body(name: str, model_dir: Path, policy_url: str, **over: Any) -> dict[str, Any]:
    """A tiny run whose failed stages are retried after 1 s (the default waits minutes)."""
    body = tiny_run_config(name, model_dir, policy_url, model_dir.parent, seed=3)
    body["services"].update(concurrency=4, stage_retry_intervals_s=[1, 1, 1])
    for key, value in over.items():
        if isinstance(value, dict):
            body.setdefault(key, {}).update(value)
        else:
            body[key] = value
    return body


def deployment(policy_url: str, model_dir: Path, root: Path, **more: str) -> dict[str, str]:
    """The deployment's settings (the coordinator's environment): its policy service, and the
    folders a posted run may name files in (the tiny model and its judge template, the test's
    files); docs/api.md, trust model."""
    return {
        "SELFREWARD_SERVICES__POLICY_URL": policy_url,
        "SELFREWARD_ALLOWED_PATHS": f"{root}:{model_dir.parent}",
        **more,
    }


class Cluster:
    def __init__(
        self, root: Path, redis_url: str, stack: ExitStack, env: dict[str, str] | None = None
    ) -> None:
        self.root = root
        self.redis_url = redis_url
        self.stack = stack
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "SELFREWARD_API_TOKEN": TOKEN,
            "SELFREWARD_ARTIFACT_ROOT": str(root / "artifacts"),
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        self.coordinator = None
        self.workers: list[Any] = []

    def start_coordinator(self) -> None:
        cmd = [*SELFREWARD, "serve", "coordinator", "--host", "127.0.0.1", "--port", str(self.port)]
        log = self.root / "coordinator.log"
        self.coordinator = self.stack.enter_context(background(cmd, log, self.env))
        wait_http(f"{self.url}/healthz", 60, self.coordinator, log)

    def kill_coordinator(self) -> None:
        assert self.coordinator is not None
        os.killpg(self.coordinator.pid, signal.SIGKILL)
        self.coordinator.wait()

    def start_worker(self, n: int = 0) -> Any:
        cmd = [
            *SELFREWARD,
            "worker",
            "start",
            *QUEUES,
            "--redis-url",
            self.redis_url,
            "--name",
            f"w{n}-{time.time_ns()}",
        ]
        proc = self.stack.enter_context(background(cmd, self.root / f"worker{n}.log", self.env))
        self.workers.append(proc)
        return proc

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def wait_iteration(
        self, run: str, t: int, statuses: tuple[str, ...], timeout_s: float = 300
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        with self.client() as c:
            while time.monotonic() < deadline:
                r = c.get(f"/runs/{run}/iterations/{t}")
                if r.status_code == 200 and r.json()["status"] in statuses:
                    return r.json()
                time.sleep(1)
        logs = "\n".join(
            (self.root / f).read_text()[-3000:] for f in os.listdir(self.root) if f.endswith(".log")
        )
        raise AssertionError(
            f"iteration {t} of {run} not {statuses} after {timeout_s} s; last: {r.text}\n{logs}"
        )


@contextmanager
def cluster(tmp_path: Path, redis_url: str, env: dict[str, str]) -> Iterator[Cluster]:
    with ExitStack() as stack:
        c = Cluster(tmp_path, redis_url, stack, env)
        c.start_coordinator()
        yield c


def horse_of(worker: Any, timeout_s: float = 30) -> psutil.Process:
    """The work-horse process executing the worker's current job (RQ forks one per job)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in psutil.Process(worker.pid).children():
            try:
                if "Processing" in " ".join(child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.05)
    raise AssertionError("no work-horse found")


def wait_records(path: Path, at_least: int, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file():
            n = path.read_bytes().count(b"\n")
            if n >= at_least:
                return n
        time.sleep(0.02)
    raise AssertionError(f"{path}: fewer than {at_least} records after {timeout_s} s")


@pytest.mark.timeout(900)
def test_rest_session_iteration_restart_and_idempotent_start(
    tmp_path: Path, redis_url: str, redis_conn, tiny_model_dir: Path, policy_server
) -> None:
    with cluster(tmp_path, redis_url, deployment(policy_server.url, tiny_model_dir, tmp_path)) as c:
        with c.client(token=None) as anon:
            assert anon.get("/healthz").json()["status"] == "ok"
            assert "/runs/{run_id}/iterations" in anon.get("/openapi.json").json()["paths"]
            # mutating routes need the token
            assert (
                anon.post(
                    "/runs", json=run_body("r1", tiny_model_dir, policy_server.url, eval=ON_COLLAPSE)
                ).status_code
                == 401
            )
        with c.client() as api:
            bad = api.post("/runs", json={"name": "x", "dpo": {"beta": -1, "betta": 2}, "variant": "nope"})
            assert bad.status_code == 422
            fields = {d["field"] for d in bad.json()["detail"]}
            assert {"dpo.beta", "dpo.betta", "variant"} <= fields
            created = api.post(
                "/runs", json=run_body("r1", tiny_model_dir, policy_server.url, eval=ON_COLLAPSE)
            )
            assert created.status_code == 201, created.text
            # the deployment's SELFREWARD_* overrides apply to posted configs
            assert created.json()["config"]["artifact_root"] == str(tmp_path / "artifacts")
            assert (
                api.post(
                    "/runs", json=run_body("r1", tiny_model_dir, policy_server.url, eval=ON_COLLAPSE)
                ).status_code
                == 200
            )
            other = run_body("r1", tiny_model_dir, policy_server.url, eval=ON_COLLAPSE, seed=99)
            assert api.post("/runs", json=other).status_code == 409
            started = api.post("/runs/r1/iterations")
            assert started.status_code == 202, started.text
            assert started.json()["t"] == 1
            assert api.post("/runs/r1/iterations").status_code == 409  # not twice
            assert api.get("/runs/nope").status_code == 404
        # workers on other "hosts": stage jobs are picked up from the queues
        c.start_worker(1)
        setup = c.wait_iteration("r1", 0, ("done",), 300)
        sft = {s["stage"]: s for s in setup["stages"]}["sft"]  # its progress ends at its last step and loss
        assert sft["progress"]["done"] == sft["counts"]["steps"], sft
        assert sft["progress"]["loss"] == pytest.approx(sft["counts"]["metrics"]["last_loss"]), sft
        # the coordinator dies mid-iteration; a new one shows the same state and the work goes on
        with c.client() as api:
            before = api.get("/runs/r1").json()
        c.kill_coordinator()
        c.start_coordinator()
        with c.client() as api:
            after = api.get("/runs/r1").json()
            assert after["iterations"][0] == before["iterations"][0] == {"t": 0, "status": "done"}
        detail = c.wait_iteration("r1", 1, ("done", "failed"), 600)
        assert detail["status"] == "done", detail
        assert [s["state"] for s in detail["stages"]] == ["done"] * 7
        # the progress a stage leaves ends equal to its manifest's counts
        prompts = detail["stages"][0]
        assert prompts["progress"]["done"] == prompts["counts"]["prompts"], prompts
        assert prompts["progress"]["attempts"] == prompts["counts"]["attempts"], prompts
        assert detail["feedback"]["pairs"] >= 1 and "tie_rate" in detail["feedback"]
        assert {"win_rate", "wins", "ties", "losses", "rm_pairwise_accuracy"} <= set(detail["metrics"])
        with c.client() as api:
            summary = api.get("/runs/r1").json()
            assert summary["completed_iterations"] == 1
            assert [m["model"] for m in summary["models"]] == ["m0", "m1", "m2"]
            assert any(r["run"] == "r1" for r in api.get("/runs").json())
            metrics = api.get("/metrics").text
            assert "selfreward_coordinator_requests_total" in metrics and "selfreward_queue_length" in metrics
            # cancel stops the live iteration only: on a finished run it changes nothing
            nothing = api.post("/runs/r1/cancel")
            assert nothing.status_code == 200 and nothing.json()["cancelled_iterations"] == []
            assert api.get("/runs/r1").json()["iterations"] == summary["iterations"]
            second = api.post("/runs/r1/iterations")  # a start works after it
            assert second.status_code == 202 and second.json()["t"] == 2
            cancelled = api.post("/runs/r1/cancel").json()
            assert cancelled["cancelled_iterations"] == [2]
            assert {"t": 2, "status": "cancelled"} in cancelled["iterations"]
            assert {"t": 1, "status": "done"} in cancelled["iterations"]
            # a cancelled iteration is resumed by a resume or by the next start, and cancelled again
            assert api.post("/runs/r1/iterations/2/resume").status_code == 202
            assert api.post("/runs/r1/iterations").status_code == 409  # it is live again
            assert api.post("/runs/r1/cancel").json()["cancelled_iterations"] == [2]
            restarted = api.post("/runs/r1/iterations")
            assert restarted.status_code == 202 and restarted.json()["t"] == 2
            assert api.post("/runs/r1/cancel").json()["cancelled_iterations"] == [2]


@pytest.mark.timeout(900)
def test_rest_teacher_variants_through_the_judge_service_and_gemini(
    tmp_path: Path, redis_url: str, redis_conn, tiny_model_dir: Path, openai_teacher: str, policy_server
) -> None:
    """teacher-reward judged through the judge service (an OpenAI-compatible teacher: a second
    model served by vLLM), and teacher-demo with the Gemini fake writing the chosen answers."""
    from selfreward.testing.fake_gemini import fake_gemini

    teacher = openai_teacher
    answer = "The teacher's complete answer."

    def reply(model: str, prompt: str, body: dict[str, Any]) -> str:
        return "m" if "Best Model Identifier" in prompt else answer

    judge_port = free_port()
    judge_url = f"http://127.0.0.1:{judge_port}"
    with ExitStack() as outer:
        gemini = outer.enter_context(fake_gemini(api_key="gk", reply=reply))
        env = deployment(
            policy_server.url,
            tiny_model_dir,
            tmp_path,
            SELFREWARD_SERVICES__JUDGE_URL=judge_url,
            SELFREWARD_ALLOWED_BACKENDS=f"openai:{policy_server.url}/v1#*,gemini:*",
            SELFREWARD_ALLOWED_GEMINI_BASE_URLS=gemini.base_url,
        )
        c = outer.enter_context(cluster(tmp_path, redis_url, env))
        template = tiny_model_dir.parent / "short-judge.txt"
        judge_env = {
            **c.env,
            "POLICY_URL": policy_server.url,
            "SELFREWARD_JUDGE__TEMPLATE": str(template),
            "SELFREWARD_JUDGE__MODE": "logprob",
        }
        judge_log = tmp_path / "judge.log"
        judge = c.stack.enter_context(
            background([*SELFREWARD, "serve", "judge", "--port", str(judge_port)], judge_log, judge_env)
        )
        wait_http(f"{judge_url}/healthz", 60, judge, judge_log)
        c.env["GEMINI_API_KEY"] = "gk"  # the workers' environment (teacher-demo writes with Gemini)
        treward = run_body(
            "treward",
            tiny_model_dir,
            policy_server.url,
            variant="teacher-reward",
            teacher={"backend": teacher},
        )
        tdemo = run_body(
            "tdemo",
            tiny_model_dir,
            policy_server.url,
            variant="teacher-demo",
            teacher={"backend": "gemini:gemini-pro", "gemini_base_url": gemini.base_url},
            eval={"judge": "gemini:gemini-pro"},
        )
        with c.client() as api:
            for body in (treward, tdemo):
                assert api.post("/runs", json=body).status_code == 201
                assert api.post(f"/runs/{body['name']}/iterations").status_code == 202
        c.start_worker(1)
        for name in ("treward", "tdemo"):
            detail = c.wait_iteration(name, 1, ("done", "failed"), 600)
            assert detail["status"] == "done", (detail.get("failed_stage"), detail.get("error"))
        root = tmp_path / "artifacts" / "runs"
        judged = load_jsonl(root / "treward" / "iter-1" / "judgments.jsonl")
        assert judged and {j["judge"] for j in judged} == {teacher}
        with httpx.Client() as http:  # the verdicts went through the judge service
            assert 'endpoint="/v1/score"' in http.get(f"{judge_url}/metrics").text
        pairs = load_jsonl(root / "tdemo" / "iter-1" / "pairs.jsonl")
        assert pairs and all(p["chosen"][0]["content"] == answer for p in pairs)
        assert all(r.key_ok for r in gemini.requests)


@pytest.mark.timeout(900)
def test_rest_meta_reward_spin_cream_and_temporal_iterations(
    tmp_path: Path, redis_url: str, redis_conn, tiny_model_dir: Path, policy_server
) -> None:
    """meta-reward through the coordinator and RQ workers: the meta_judgments stage runs on the
    judge queue and the pairs stage records both kinds of pairs by its rules; then spin through
    the same cluster: no judge, the seed's human answers chosen; then cream: its
    reference_judgments stage on the judge queue, the consistency rate trained with; then
    temporal: its four stages on their queues, the future model trained, served and judged."""
    body = run_body(
        "meta",
        tiny_model_dir,
        policy_server.url,
        variant="meta-reward",
        judge={"samples": 2, "mode": "sample", "max_tokens": 16},
        meta={"judge_pair_fraction": 0.5, "max_tokens": 16, "max_judgment_chars": None},
        eval={"continue_on_collapse": True},
    )
    with cluster(tmp_path, redis_url, deployment(policy_server.url, tiny_model_dir, tmp_path)) as c:
        with c.client() as api:
            assert api.post("/runs", json=body).status_code == 201
            r = api.post("/runs/meta/iterations")
            assert r.status_code == 202 and "1:meta_judgments" in r.json()["jobs"]
        c.start_worker(0)
        detail = c.wait_iteration("meta", 1, ("done", "failed"), 600)
        assert detail["status"] == "done", (detail.get("failed_stage"), detail.get("error"))
        stages = {s["stage"]: s for s in detail["stages"]}
        assert stages["meta_judgments"]["queue"] == "judge" and stages["meta_judgments"]["state"] == "done"
        feedback = detail["feedback"]
        assert feedback["pairs_by_kind"].get("actor", 0) >= 1
        judged = feedback["judge_pairs"]["meta_judged"]
        assert (
            feedback["pairs_by_kind"].get("judge", 0) + sum(feedback["judge_pairs"]["dropped"].values())
            == judged
        )
        meta = read_manifest(
            tmp_path / "artifacts" / "runs" / "meta" / "iter-1" / "meta_judgments.manifest.json"
        )
        assert meta["candidates"] == judged and meta["battles"] == judged  # 2 judgments: 1 battle each
        spin = run_body(
            "spin", tiny_model_dir, policy_server.url, variant="spin", prompts={"source": "seed-ift"}
        )
        with c.client() as api:
            assert api.post("/runs", json=spin).status_code == 201
            assert api.post("/runs/spin/iterations").status_code == 202
        detail = c.wait_iteration("spin", 1, ("done", "failed"), 600)
        assert detail["status"] == "done", (detail.get("failed_stage"), detail.get("error"))
        stages = {s["stage"]: s for s in detail["stages"]}
        assert stages["judgments"]["counts"]["skipped"]
        feedback = detail["feedback"]
        assert feedback["pairs"] >= 1 and feedback["pairs_by_kind"] == {"spin": feedback["pairs"]}
        run = tmp_path / "artifacts" / "runs" / "spin"
        human = {r["id"]: r["response"] for r in load_jsonl(run / "seed" / "ift.jsonl")}
        for p in load_jsonl(run / "iter-1" / "pairs.jsonl"):
            assert p["chosen"][0]["content"] == human[p["chosen_id"].removeprefix("human:")]
        cream = run_body("cream", tiny_model_dir, policy_server.url, variant="cream")
        with c.client() as api:
            assert api.post("/runs", json=cream).status_code == 201
            r = api.post("/runs/cream/iterations")
            assert r.status_code == 202 and "1:reference_judgments" in r.json()["jobs"]
        detail = c.wait_iteration("cream", 1, ("done", "failed"), 600)
        assert detail["status"] == "done", (detail.get("failed_stage"), detail.get("error"))
        stages = {s["stage"]: s for s in detail["stages"]}
        assert stages["reference_judgments"]["queue"] == "judge"
        assert detail["feedback"]["pairs_by_kind"] == {"cream": detail["feedback"]["pairs"]}
        run = tmp_path / "artifacts" / "runs" / "cream"
        reference = load_jsonl(run / "iter-1" / "reference_judgments.jsonl")
        assert reference and {j["judge"] for j in reference} == {"policy:tiny"}  # M0 judges iteration 1
        confidence = read_manifest(run / "iter-1" / "pairs.manifest.json")["preference_confidence"]
        m2 = read_manifest(run / "models" / "m2" / "manifest.json")
        assert m2["identity"].get("preference_confidence") == confidence
        temporal = run_body("temporal", tiny_model_dir, policy_server.url, variant="temporal")
        with c.client() as api:
            assert api.post("/runs", json=temporal).status_code == 201
            r = api.post("/runs/temporal/iterations")
            assert r.status_code == 202 and "1:future_train" in r.json()["jobs"]
        detail = c.wait_iteration("temporal", 1, ("done", "failed"), 600)
        assert detail["status"] == "done", (detail.get("failed_stage"), detail.get("error"))
        queues = {s["stage"]: s["queue"] for s in detail["stages"]}
        assert (queues["anchored_pairs"], queues["future_train"]) == ("judge", "train")
        assert (queues["future_candidates"], queues["future_judgments"]) == ("generate", "judge")
        run = tmp_path / "artifacts" / "runs" / "temporal"
        anchored = load_jsonl(run / "iter-1" / "anchored_pairs.jsonl")
        pairs = load_jsonl(run / "iter-1" / "pairs.jsonl")
        assert [p["prompt_id"] for p in pairs] == [p["prompt_id"] for p in anchored]
        assert (run / "models" / "m2-future" / "manifest.json").is_file()
        assert sum(detail["feedback"]["pairs_by_kind"].values()) == len(pairs)
