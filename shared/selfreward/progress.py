"""Progress of long work, reported the same way everywhere.

Stage code takes a `Progress` and calls `task = progress.task(name, total)`, then
`task.advance(n, **fields)`. Sinks turn that into a rich bar on the CLI
(`selfreward.cli.ui.RichProgressSink`), RQ job meta for the API (`rq_meta_sink`), a progress
file the dashboard polls in the embedded mode (`file_sink`), or nothing.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ProgressEvent:
    task: str
    done: int
    total: int | None
    started_at: float
    fields: dict[str, Any] = field(default_factory=dict)
    finished: bool = False

    @property
    def elapsed_s(self) -> float:
        return time.time() - self.started_at

    @property
    def eta_s(self) -> float | None:
        if not self.total or self.done <= 0 or self.done >= self.total:
            return None
        return self.elapsed_s / self.done * (self.total - self.done)

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "done": self.done,
            "total": self.total,
            "elapsed_s": round(self.elapsed_s, 1),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
            "finished": self.finished,
            **self.fields,
        }


Sink = Callable[[ProgressEvent], None]


class Task:
    def __init__(self, progress: Progress, name: str, total: int | None, done: int) -> None:
        self._progress = progress
        self._lock = threading.Lock()
        self.event = ProgressEvent(name, done, total, time.time())

    def advance(self, n: int = 1, **fields: Any) -> None:
        with self._lock:
            self.event.done += n
            self.event.fields.update(fields)
        self._progress.emit(self.event)

    def update(self, done: int | None = None, total: int | None = None, **fields: Any) -> None:
        with self._lock:
            if done is not None:
                self.event.done = done
            if total is not None:
                self.event.total = total
            self.event.fields.update(fields)
        self._progress.emit(self.event)

    def close(self) -> None:
        self.event.finished = True
        self._progress.emit(self.event)

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Progress:
    def __init__(self, *sinks: Sink) -> None:
        self.sinks = list(sinks)

    def task(self, name: str, total: int | None, done: int = 0) -> Task:
        t = Task(self, name, total, done)
        self.emit(t.event)
        return t

    def emit(self, event: ProgressEvent) -> None:
        for sink in self.sinks:
            sink(event)


NULL_PROGRESS = Progress()


def rq_meta_sink(job: Any, key: str = "progress", min_interval_s: float = 1.0) -> Sink:
    """Write progress into an RQ job's meta (throttled; always on finish)."""
    last = [0.0]

    def sink(event: ProgressEvent) -> None:
        now = time.time()
        if not event.finished and now - last[0] < min_interval_s:
            return
        last[0] = now
        job.meta[key] = event.as_dict()
        job.save_meta()

    return sink


def file_sink(path: Any, min_interval_s: float = 1.0, **about: Any) -> Sink:
    """Write progress into a JSON file, atomically (throttled; always on finish): what the
    dashboard reads of a stage running in the embedded mode.

    The file holds `about` (stage, t), the process (pid, host: a reader on the same host can
    tell a crashed run from a running one), when the stage started and was last updated, the
    newest event (`current`) and the last event of every task by name (`tasks`)."""
    from selfreward.storage import atomic_write_json

    started = time.time()
    tasks: dict[str, dict[str, Any]] = {}
    last = [0.0]
    lock = threading.Lock()

    def sink(event: ProgressEvent) -> None:
        with lock:
            tasks[event.task] = event.as_dict()
            now = time.time()
            if not event.finished and now - last[0] < min_interval_s:
                return
            last[0] = now
            body = {
                **about,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started_at": started,
                "updated_at": now,
                "current": tasks[event.task],
                "tasks": dict(tasks),
            }
            atomic_write_json(path, body)

    return sink
