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

A lost worker is noticed by RQ's own mechanisms, with shorter intervals than RQ's defaults
(docs/api.md, "When a worker is lost"): the parent sends a heartbeat every `HEARTBEAT_S` while
its horse works and each heartbeat keeps the job's entry in the started registry alive for
`JOB_TTL_S`; every worker cleans the registries of its queues every `MAINTENANCE_S` (RQ's
default is 10 minutes), which retries (or fails) a job whose entry expired. Children die with
their worker (Linux `PR_SET_PDEATHSIG`), so no orphan finishes a job nobody watches or keeps
the queue's scheduler lock: the horse gets SIGKILL; RQ's scheduler child gets SIGTERM, stops and
releases its lock, so a new worker takes the scheduler over when it starts (where the lock
holder vanished with its host, the lock expires 61 s after its last refresh and a worker's
maintenance pass takes over).
"""

from __future__ import annotations

import importlib
import signal
from typing import Any

from selfreward.processes import children_die_with_their_parent, die_with_parent
from selfreward.stages.stage import QUEUES

TRAIN_PRELOAD = ("torch", "transformers", "peft", "trl", "datasets", "selfreward.training.trainers")
HEARTBEAT_S = 5  # the worker's heartbeat while a job runs (RQ's job_monitoring_interval; default 30)
JOB_TTL_S = 30  # a running job's registry entry lives this long after each heartbeat (RQ: 90)
MAINTENANCE_S = 10  # registry cleanup and scheduler take-over by every worker (RQ: 600)
LOST_AFTER_S = 20  # the API calls a worker lost when its last heartbeat is older than this


def stage_worker_class() -> type[Any]:
    """RQ's forking Worker with the intervals above and a job TTL of `JOB_TTL_S` after each
    heartbeat instead of RQ's fixed 60 s margin."""
    from rq import Worker

    class StageWorker(Worker):
        def setup_work_horse_signals(self) -> None:
            # runs in the work-horse: it dies at once with its worker, whatever its job's code
            # does with SIGTERM (the fork hook gave every child SIGTERM, for the scheduler)
            super().setup_work_horse_signals()
            die_with_parent(signal.SIGKILL)

        def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
            if job.timeout and job.timeout > 0:
                remaining = job.timeout - working_time
                return int(min(remaining, self.job_monitoring_interval)) + JOB_TTL_S - HEARTBEAT_S
            return JOB_TTL_S

    return StageWorker


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
    from rq import Queue

    unknown = sorted(set(queues) - set(QUEUES))
    if unknown or not queues:
        raise ValueError(f"unknown queue(s) {unknown or queues}; queues: {list(QUEUES)}")
    if preload and "train" in queues:  # imported once here, inherited by every forked job
        for module in TRAIN_PRELOAD:
            importlib.import_module(module)
    connection = Redis.from_url(redis_url)
    # SIGTERM: RQ's scheduler child then stops cleanly and releases the queue's scheduler lock,
    # so a new worker takes the scheduler over at once; the work-horse re-arms it as SIGKILL
    children_die_with_their_parent(signal.SIGTERM)
    from selfreward.drivers.rq import on_horse_killed

    worker = stage_worker_class()(
        [Queue(q, connection=connection) for q in queues],
        connection=connection,
        name=name,
        work_horse_killed_handler=on_horse_killed,
        job_monitoring_interval=HEARTBEAT_S,
        maintenance_interval=MAINTENANCE_S,
        worker_ttl=MAINTENANCE_S + 15,  # an idle worker's blocking dequeue lasts worker_ttl - 15 s
    )
    return worker.work(burst=burst, with_scheduler=with_scheduler, logging_level=logging_level)
