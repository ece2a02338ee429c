"""`selfreward stack up | status | down`: the distributed mode's services on one machine, real
processes on loopback (Redis, vLLM on the tiny model, the judge service, the coordinator, the
workers), stopped by PID."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from selfreward.testing.tiny_run import tiny_run_config

SELFREWARD = [sys.executable, "-m", "selfreward.cli.main"]


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SELFREWARD, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(900)
def test_stack_up_starts_every_service_and_down_stops_exactly_them(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    config = tiny_run_config(
        "stacked",
        tiny_model_dir,
        "http://127.0.0.1:9",
        tmp_path,
        artifact_root=str(tmp_path / "artifacts"),
        policy={"cpu_kvcache_gib": 1, "max_lora_rank": 16, "max_loras": 2},
    )
    config_file = tmp_path / "stacked.yaml"
    config_file.write_text(yaml.safe_dump(config))
    folder = tmp_path / "stack"
    up = _cli("stack", "up", "--config", str(config_file), "--dir", str(folder))
    assert up.returncode == 0, up.stdout + up.stderr
    assert "stack up" in up.stdout and "run.json" in up.stdout
    stack = json.loads((folder / "stack.json").read_text())
    services = stack["services"]
    assert list(services) == ["redis", "policy", "judge", "coordinator", "worker-cpu", "worker-train"]
    assert (folder / "stack.json").stat().st_mode & 0o077 == 0  # it holds the token
    procs = {name: psutil.Process(s["pid"]) for name, s in services.items()}
    tree = [p for proc in procs.values() for p in (proc, *proc.children(recursive=True))]
    try:
        status = _cli("stack", "status", "--dir", str(folder))
        assert status.returncode == 0, status.stdout + status.stderr
        for name in services:
            assert name in status.stdout
        api = services["coordinator"]["url"]
        auth = {"Authorization": f"Bearer {stack['token']}"}
        assert httpx.get(f"{api}/runs").status_code == 401  # the generated token is required
        body = json.loads((folder / "run.json").read_text())
        created = httpx.post(f"{api}/runs", json=body, headers=auth, timeout=30)
        assert created.status_code == 201, created.text
        # the coordinator pins this stack's services in every posted run
        got = created.json()["config"]["services"]
        assert got["policy_url"] == services["policy"]["url"] and got["judge_url"] == services["judge"]["url"]
        assert created.json()["config"]["artifact_root"] == str(tmp_path / "artifacts")
        models = httpx.get(f"{services['policy']['url']}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]][:1] == ["tiny"]
        assert httpx.get(f"{services['judge']['url']}/healthz", timeout=10).status_code == 200
        metrics = httpx.get(f"{api}/metrics", timeout=10).text
        assert 'selfreward_workers{queue="train"} 1.0' in metrics
        assert 'selfreward_workers{queue="judge"} 1.0' in metrics
        again = _cli("stack", "up", "--config", str(config_file), "--dir", str(folder))
        assert again.returncode == 0 and "already up" in again.stdout
        assert json.loads((folder / "stack.json").read_text())["services"] == services
        for name, s in services.items():
            assert Path(s["log"]).is_file(), name
    finally:
        down = _cli("stack", "down", "--dir", str(folder))
    assert down.returncode == 0, down.stdout + down.stderr
    _gone, alive = psutil.wait_procs(tree, timeout=30)
    assert alive == [], f"left running: {alive}"
    assert not (folder / "stack.json").exists()
    after = _cli("stack", "status", "--dir", str(folder))
    assert after.returncode == 1 and "no stack" in after.stdout
    assert (folder / "redis" / "appendonlydir").is_dir()  # Redis persisted under DIR
