"""Both jobs through RQ with a real redis-server and a real worker process; a DPO job whose worker is
killed (SIGKILL, work horse included) mid-training resumes from its checkpoint when RQ retries it,
ends with the same number of steps, and yields the same adapter as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from test_train_jobs import train_config, write_jsonl, write_pairs, write_seed

from selfreward.config import RunConfig
from selfreward.drivers.rq import enqueue_stage
from selfreward.drivers.state import RunStore
from selfreward.stages.plan import stage_named
from selfreward.storage import RunLayout, write_manifest


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def start_worker(redis_url: str, log: Path) -> subprocess.Popen:
    """`selfreward worker start --queue train` (the stage worker on the train queue)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    argv = ["worker", "start", "--queue", "train", "--redis-url", redis_url, "--no-with-scheduler"]
    with open(log, "a") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "selfreward.cli.main", *argv],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )


def kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL a worker and its work horse (which runs in its own process group)."""
    pids = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait()
    return pids


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def finished(job: Any) -> bool:
    status = job.get_status(refresh=True)
    if status == "failed":
        raise AssertionError(f"job {job.id} failed:\n{job.latest_result().exc_string}")
    return status == "finished"


def complete_checkpoint(folder: Path, min_step: int) -> int | None:
    steps = [
        int(p.name.split("-")[1])
        for p in folder.glob("checkpoint-*")
        if (p / "trainer_state.json").is_file() and int(p.name.split("-")[1]) >= min_step
    ]
    return max(steps) if steps else None


def stage_job(conn: Any, config: RunConfig, t: int, stage: str, retries: int = 0) -> Any:
    """The stage job the coordinator enqueues for `stage` of iteration t (RQ retries, no interval)."""
    from rq import Retry

    return enqueue_stage(
        conn, config.name, max(t, 1), t, stage_named(stage, t), retry=Retry(max=retries) if retries else None
    )


def a_run(conn: Any, config: RunConfig, tiny_model_dir: Path, seed: Path) -> RunLayout:
    """A run registered with the coordinator's store whose set-up prepared M0 and the seed data."""
    RunStore(conn).create_run(config)
    layout = RunLayout(config.artifact_root, config.name)
    layout.seed_dir.mkdir(parents=True, exist_ok=True)
    for name in ("ift.jsonl", "eft_train.jsonl"):
        (layout.seed_dir / name).write_bytes((seed / name).read_bytes())
    write_manifest(
        layout.stage_manifest(0, "prepare"),
        {
            "stage": "prepare",
            "base_model_dir": str(tiny_model_dir),
            "base_served_name": "tiny",
            "seed_dir": str(layout.seed_dir),
            "seed_counts": {},
        },
    )
    return layout


def test_jobs_on_rq_and_resume_after_the_worker_is_killed(
    redis_url: str, redis_conn: Any, tmp_path: Path, tiny_model_dir: Path
) -> None:
    import torch
    from rq import Queue
    from safetensors.torch import load_file

    from selfreward.training import runner
    from selfreward.training.request import dpo_request

    config = train_config(tmp_path / "art", tiny_model_dir)
    long_dpo = config.model_copy(
        update={
            "dpo": config.dpo.model_copy(update={"max_steps": 80}),
            "training": config.training.model_copy(update={"checkpoint_steps": 5}),
        }
    )
    seed = write_seed(tmp_path / "seed")
    layout = a_run(redis_conn, long_dpo, tiny_model_dir, seed)
    pairs = write_pairs(layout.stage_file(1, "pairs"))
    workers: list[subprocess.Popen] = []
    try:
        workers.append(start_worker(redis_url, tmp_path / "worker1.log"))
        # the sft stage through RQ: result, meta progress
        sft = stage_job(redis_conn, long_dpo, 0, "sft")
        wait_for(lambda: finished(sft), 180, "the SFT job")
        result = sft.return_value(refresh=True)
        assert result["stage"] == "sft" and result["manifest"]["model"] == "m1"
        assert result["manifest"]["steps"] == 12
        progress = sft.get_meta(refresh=True)["progress"]
        assert progress["finished"] and progress["step"] == progress["total_steps"] == 12
        assert {"loss", "eta_s", "elapsed_s"} <= set(progress)

        # the train stage (DPO) through RQ, killed for real once a checkpoint at step >= 10 is complete
        dpo = stage_job(redis_conn, long_dpo, 1, "train", retries=1)
        request = dpo_request(long_dpo, pairs=pairs, name="m2", parent="m1", base_model=tiny_model_dir)
        killed_at = wait_for(lambda: complete_checkpoint(request.checkpoint_dir, 10), 180, "a checkpoint")
        horses = kill_tree(workers[0])
        assert horses, "the job ran in a forked work horse"
        assert all(wait_for(lambda p=p: gone(p), 10, f"pid {p} to die") for p in horses)
        assert killed_at < 80 and not request.manifest_path.exists()
        assert dpo.get_status(refresh=True) == "started"  # abandoned: RQ does not know yet

        # RQ's abandoned-job handling, as a worker runs it once the heartbeat expired: retried
        Queue("train", connection=redis_conn).started_job_registry.cleanup(timestamp=time.time() + 3600)
        assert dpo.get_status(refresh=True) == "queued"
        workers.append(start_worker(redis_url, tmp_path / "worker2.log"))
        wait_for(lambda: finished(dpo), 180, "the resumed DPO job")
        assert dpo.return_value(refresh=True)["manifest"]["model"] == "m2"
        m2 = json.loads(request.manifest_path.read_text())
        training = m2["training"]
        assert training["resumed_from_step"] >= killed_at >= 10
        assert training["global_step"] == training["total_steps"] == 80
        assert training["session_steps"] == 80 - training["resumed_from_step"]
        assert dpo.get_meta(refresh=True)["progress"]["resumed_from_step"] == training["resumed_from_step"]
        assert not request.work_dir.exists()

        # a bad input fails the job with the clear message, before any training, and is not retried
        same = [{"role": "assistant", "content": "Same."}]
        write_jsonl(
            layout.stage_file(2, "pairs"),
            [
                {
                    "prompt_id": "x",
                    "prompt": [{"role": "user", "content": "Hi"}],
                    "chosen": same,
                    "rejected": same,
                }
            ],
        )
        bad = stage_job(redis_conn, long_dpo, 2, "train", retries=2)
        wait_for(lambda: bad.get_status(refresh=True) == "failed", 60, "the bad job to fail")
        assert "all 1 records were skipped (chosen_equals_rejected: 1)" in bad.latest_result().exc_string
        assert RunStore(redis_conn).iteration(long_dpo.name, 2).failed_stage == "train"  # type: ignore[union-attr]
    finally:
        for proc in workers:
            if proc.poll() is None:
                kill_tree(proc)

    # the resumed model equals an uninterrupted run of the same job
    torch.set_num_threads(1)
    straight = runner.run(
        dpo_request(long_dpo, pairs=pairs, name="m2-straight", parent="m1", base_model=tiny_model_dir)
    )
    assert straight["training"]["resumed_from_step"] == 0
    resumed = load_file(request.model_dir / "adapter_model.safetensors")
    reference = load_file(request.layout.model_dir("m2-straight") / "adapter_model.safetensors")
    for key, tensor in reference.items():
        assert (resumed[key] - tensor).abs().max() < 1e-5, key
    assert m2["metrics"]["last_loss"] == pytest.approx(straight["metrics"]["last_loss"], abs=1e-5)
