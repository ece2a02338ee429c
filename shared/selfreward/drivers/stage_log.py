"""The log of one stage attempt: what the worker printed for that job, in one file per attempt
(`RunLayout.stage_log`: runs/<run>/logs/iter-<t>/<stage>.<attempt>.log).

`capture(path)` copies, for as long as it is open, every log record of the process (INFO and
up; the HTTP clients' one line per request is left out, their warnings kept) and everything
written to `sys.stdout` / `sys.stderr` (warnings, progress bars) into the file, while the worker's
own output goes on as before. `read_log` returns a log's text or its last lines.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

# loggers that write one INFO line per HTTP request
CHATTY = ("httpx", "httpcore", "urllib3", "uvicorn.access")


class _NoRequestLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        chatty = any(record.name == n or record.name.startswith(n + ".") for n in CHATTY)
        return not chatty or record.levelno >= logging.WARNING


class _Tee:
    """A text stream writing to the original stream and to the log file."""

    def __init__(self, original: IO[str], copy: IO[str]) -> None:
        self._original = original
        self._copy = copy

    def write(self, text: str) -> int:
        self._copy.write(text)
        return self._original.write(text)

    def flush(self) -> None:
        self._copy.flush()
        self._original.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding ... of the original
        return getattr(self._original, name)


@contextmanager
def capture(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    with path.open("a", encoding="utf-8", buffering=1) as out:
        handler = logging.StreamHandler(out)
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        handler.addFilter(_NoRequestLines())
        old_level = root.level
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        root.addHandler(handler)
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(stdout, out), _Tee(stderr, out)  # type: ignore[assignment]
        try:
            yield path
        except BaseException:
            out.write(traceback.format_exc())
            raise
        finally:
            sys.stdout, sys.stderr = stdout, stderr
            root.removeHandler(handler)
            root.setLevel(old_level)


def attempt_logs(folder: Path, stage: str) -> dict[int, Path]:
    """The attempt logs of `stage` in an iteration's log folder, by attempt number."""
    out = {}
    for path in folder.glob(f"{stage}.*.log") if folder.is_dir() else ():
        number = path.name[len(stage) + 1 : -len(".log")]
        if number.isdigit():
            out[int(number)] = path
    return dict(sorted(out.items()))


def read_log(path: Path, tail: int | None = None) -> str:
    """The log's text, or its last `tail` lines (read line by line: a long log is not loaded)."""
    if tail is None:
        return path.read_text(encoding="utf-8", errors="replace")
    with path.open(encoding="utf-8", errors="replace") as f:
        return "".join(deque(f, maxlen=max(tail, 0)))
