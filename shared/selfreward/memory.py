"""Peak resident memory of a process tree, sampled: what `selfreward run` reports per stage and
for the whole run (the embedded mode's process, vLLM, the trainer's launcher and its children).

The resident set sizes (RSS) of the process and every descendant are summed every
`interval_s` in a background thread; pages two processes share (forked copies, shared
libraries) count in each, so the sum is an upper bound of what the tree holds (psutil's
proportional set size would split them, but reads every process's smaps on each sample: too slow
to sample twice a second). Peaks between samples are missed; 0.5 s is short against the
seconds a model load or a training step takes.
"""

from __future__ import annotations

import os
import threading
from types import TracebackType

import psutil

GB = 1e9


def tree_rss_bytes(pid: int) -> int:
    """RSS of `pid` and all its descendants now, in bytes (processes that exit meanwhile: 0)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


class TreeMemory:
    """Samples `pid`'s process tree (default: this process) until closed: `peak` over the whole
    life, `window_peak()` since the last `start_window()` (one stage)."""

    def __init__(self, pid: int | None = None, interval_s: float = 0.5) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.interval_s = interval_s
        self.peak = 0
        self._window = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        rss = tree_rss_bytes(self.pid)
        with self._lock:
            self.peak = max(self.peak, rss)
            self._window = max(self._window, rss)
        return rss

    def start_window(self) -> None:
        with self._lock:
            self._window = 0
        self.sample()

    def window_peak(self) -> int:
        self.sample()
        with self._lock:
            return self._window

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> TreeMemory:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="tree-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sample()
