"""The stage worker: one RQ worker for any mix of the queues `generate`, `judge`, `train`, `evaluate`.

    selfreward worker start --queue generate --queue judge --queue evaluate   (a CPU host)
    selfreward worker start --queue train                                     (a GPU host)

It is RQ's default forking `Worker`: each job runs in a fresh child process (the "work horse"),
so all memory (CUDA included) is returned when a job ends, an out-of-memory kill or a crash
fails only that job (RQ retries it when it was enqueued with `Retry`, and it resumes from what
it wrote), and the worker enforces `job_timeout` by killing the horse. The parent never
initialises CUDA, so forking is safe.

Imports: a worker of the generate/judge/evaluate queues never imports torch, transformers,
TRL, PEFT or vLLM (its stages talk to the policy and judge services over HTTP), so it runs from
the torch-free install (`pip install 'selfreward[worker]'`). A worker that serves `train` imports
the training libraries once in the parent (`preload`), so each forked job starts without those
~7 s of imports.
"""

from __future__ import annotations

import importlib

from selfreward.stages.stage import QUEUES

TRAIN_PRELOAD = ("torch", "transformers", "peft", "trl", "datasets", "selfreward.training.trainers")


def start_worker(
    redis_url: str,
    queues: list[str],
    *,
    burst: bool = False,
    name: str | None = None,
    with_scheduler: bool = False,
    logging_level: str = "INFO",
    preload: bool = True,
) -> bool:
    """Run the worker loop until stopped (or until the queues are empty with `burst`)."""
    from redis import Redis
    from rq import Queue, Worker

    unknown = sorted(set(queues) - set(QUEUES))
    if unknown or not queues:
        raise ValueError(f"unknown queue(s) {unknown or queues}; queues: {list(QUEUES)}")
    if preload and "train" in queues:  # imported once here, inherited by every forked job
        for module in TRAIN_PRELOAD:
            importlib.import_module(module)
    connection = Redis.from_url(redis_url)
    worker = Worker([Queue(q, connection=connection) for q in queues], connection=connection, name=name)
    return worker.work(burst=burst, with_scheduler=with_scheduler, logging_level=logging_level)
