"""The trainer worker: an RQ worker on the `train` queue.

    python -m selfreward.drivers.worker --redis-url redis://host:6379/0 [--queue train] [--burst]
    selfreward worker train --redis-url ...            (the same, from the CLI)

It is RQ's default forking `Worker`: each job runs in a fresh child process (the "work horse").
A training job loads its own base model and adapter anyway (M(t) changes every iteration), so
keeping a model across jobs (`SimpleWorker`) would save seconds, while the forking worker gives
what long GPU jobs need: all memory (CUDA included) is returned when a job ends, an out-of-memory
kill or a crash fails only that job (RQ retries it when it was enqueued with `Retry`, and it
resumes from its checkpoint), and the worker enforces `job_timeout` by killing the horse.
The parent never initialises CUDA, so forking is safe. With `preload` (the default) the parent
imports torch, transformers, TRL and PEFT once, so each job starts without those ~7 s of imports.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

QUEUE = "train"

PRELOAD = ("torch", "transformers", "peft", "trl", "datasets", "selfreward.training.trainers")


def start_worker(
    redis_url: str,
    queues: list[str] | None = None,
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

    if preload:  # imported once here, inherited by every forked job
        for module in PRELOAD:
            importlib.import_module(module)

    connection = Redis.from_url(redis_url)
    worker = Worker(
        [Queue(q, connection=connection) for q in (queues or [QUEUE])],
        connection=connection,
        name=name,
    )
    return worker.work(burst=burst, with_scheduler=with_scheduler, logging_level=logging_level)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfreward.drivers.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument(
        "--queue", action="append", dest="queues", help=f"queue to listen on (default {QUEUE})"
    )
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    parser.add_argument("--name", default=None, help="worker name (default: RQ's)")
    parser.add_argument(
        "--with-scheduler", action="store_true", help="also run RQ's scheduler (retries with an interval)"
    )
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--no-preload", action="store_true", help="import the training libraries per job")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    start_worker(
        args.redis_url,
        args.queues,
        burst=args.burst,
        name=args.name,
        with_scheduler=args.with_scheduler,
        logging_level=args.log_level,
        preload=not args.no_preload,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
