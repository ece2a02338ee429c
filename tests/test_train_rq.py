"""Both jobs through RQ with a real redis-server and a real worker process; a DPO job whose worker is
killed (SIGKILL, work horse included) mid-training resumes from its checkpoint when RQ retries it,
ends with the same number of steps, and yields the same adapter as an uninterrupted run."""

from __future__ import annotations

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

from selfreward.training.jobs import QUEUE, enqueue_dpo, enqueue_sft


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def start_worker(redis_url: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "a") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "selfreward.drivers.worker", "--redis-url", redis_url],
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


def test_jobs_on_rq_and_resume_after_the_worker_is_killed(
    redis_url: str, redis_conn: Any, tmp_path: Path, tiny_model_dir: Path
) -> None:
    import torch
    from rq import Queue
    from safetensors.torch import load_file

    from selfreward.training import runner
    from selfreward.training.request import dpo_request

    queue = Queue(QUEUE, connection=redis_conn)
    config = train_config(tmp_path / "art", tiny_model_dir)
    long_dpo = config.model_copy(
        update={
            "dpo": config.dpo.model_copy(update={"max_steps": 80}),
            "training": config.training.model_copy(update={"checkpoint_steps": 5}),
        }
    )
    seed = write_seed(tmp_path / "seed")
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    workers: list[subprocess.Popen] = []
    try:
        workers.append(start_worker(redis_url, tmp_path / "worker1.log"))
        # SFT through RQ: result, meta progress
        sft = enqueue_sft(queue, config, name="m1", seed_dir=str(seed))
        wait_for(lambda: finished(sft), 180, "the SFT job")
        m1 = sft.return_value(refresh=True)
        assert m1["name"] == "m1" and m1["training"]["global_step"] == 12
        progress = sft.get_meta(refresh=True)["progress"]
        assert progress["finished"] and progress["step"] == progress["total_steps"] == 12
        assert {"loss", "eta_s", "elapsed_s"} <= set(progress)

        # DPO through RQ, killed for real once a checkpoint at step >= 10 is complete
        dpo = enqueue_dpo(queue, long_dpo, pairs=str(pairs), name="m2", parent="m1", retries=1)
        request = dpo_request(long_dpo, pairs=pairs, name="m2", parent="m1")
        killed_at = wait_for(lambda: complete_checkpoint(request.checkpoint_dir, 10), 180, "a checkpoint")
        horses = kill_tree(workers[0])
        assert horses, "the job ran in a forked work horse"
        assert all(wait_for(lambda p=p: gone(p), 10, f"pid {p} to die") for p in horses)
        assert killed_at < 80 and not request.manifest_path.exists()
        assert dpo.get_status(refresh=True) == "started"  # abandoned: RQ does not know yet

        # RQ's abandoned-job handling, as a worker runs it once the heartbeat expired: retried
        queue.started_job_registry.cleanup(timestamp=time.time() + 3600)
        assert dpo.get_status(refresh=True) == "queued"
        workers.append(start_worker(redis_url, tmp_path / "worker2.log"))
        wait_for(lambda: finished(dpo), 180, "the resumed DPO job")
        m2 = dpo.return_value(refresh=True)
        training = m2["training"]
        assert training["resumed_from_step"] >= killed_at >= 10
        assert training["global_step"] == training["total_steps"] == 80
        assert training["session_steps"] == 80 - training["resumed_from_step"]
        assert dpo.get_meta(refresh=True)["progress"]["resumed_from_step"] == training["resumed_from_step"]
        assert not request.work_dir.exists()

        # a bad input fails the job with the clear message, before any training
        same = [{"role": "assistant", "content": "Same."}]
        bad_pairs = write_jsonl(
            tmp_path / "bad.jsonl",
            [
                {
                    "prompt_id": "x",
                    "prompt": [{"role": "user", "content": "Hi"}],
                    "chosen": same,
                    "rejected": same,
                }
            ],
        )
        bad = enqueue_dpo(queue, config, pairs=str(bad_pairs), name="m-bad", parent="m1", retries=0)
        wait_for(lambda: bad.get_status(refresh=True) == "failed", 60, "the bad job to fail")
        assert "all 1 records were skipped (chosen_equals_rejected: 1)" in bad.latest_result().exc_string
    finally:
        for proc in workers:
            if proc.poll() is None:
                kill_tree(proc)

    # the resumed model equals an uninterrupted run of the same job
    torch.set_num_threads(1)
    straight = runner.run(dpo_request(long_dpo, pairs=pairs, name="m2-straight", parent="m1"))
    assert straight["training"]["resumed_from_step"] == 0
    resumed = load_file(request.model_dir / "adapter_model.safetensors")
    reference = load_file(request.layout.model_dir("m2-straight") / "adapter_model.safetensors")
    for key, tensor in reference.items():
        assert (resumed[key] - tensor).abs().max() < 1e-5, key
    assert m2["metrics"]["last_loss"] == pytest.approx(straight["metrics"]["last_loss"], abs=1e-5)
