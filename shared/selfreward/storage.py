"""The artifact store: atomic files, resumable JSONL, manifests, hashes, the run layout.

Every stage writes through these helpers, which is what makes stages idempotent and crash
safe:
- whole files (configs, manifests, reports) are written to a temporary name in the same
  folder, fsynced and renamed, so a reader sees the old file or the new one, never half;
- record files are JSONL appended one record per line and fsynced; on reopening, a torn
  last line (a crash mid-write) is cut off and the keys already written are loaded, so a
  resumed stage computes only what is missing and never duplicates a record;
- a finished stage writes `<stage>.manifest.json`; its presence means "done".
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfreward.errors import InputError, SelfRewardError

# ------------------------------------------------------------------ whole files


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_jsonl_atomic(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write a whole JSONL file at once (byte-identical for identical records)."""
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records]
    return atomic_write_text(path, "".join(lines))


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; rename it to `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ hashes


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_dir(path: str | Path, include: Callable[[Path], bool] | None = None) -> str:
    """Hash of a folder: relative paths and contents of its files, in sorted order."""
    root = Path(path)
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root)
        if include is not None and not include(rel):
            continue
        h.update(str(rel.as_posix()).encode() + b"\0")
        h.update(sha256_file(file).encode() + b"\n")
    return h.hexdigest()


# ------------------------------------------------------------------ JSONL


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record); a malformed line raises InputError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [r for _, r in read_jsonl(path)]


class ResumableJsonl:
    """An append-only JSONL file of keyed records that survives crashes.

    Opening it takes an exclusive lock (a second writer of the same file fails at once
    rather than duplicating records), cuts a torn last line, and loads the keys already
    written. `append` writes one line and fsyncs it. Thread-safe.
    """

    def __init__(self, path: str | Path, key: Callable[[dict[str, Any]], str]) -> None:
        self.path = Path(path)
        self.key = key
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+b")  # noqa: SIM115 - closed in close()
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            raise SelfRewardError(f"{self.path}: another process is writing this file") from None
        self.torn_bytes = self._repair()
        self.records: dict[str, dict[str, Any]] = {}
        for lineno, rec in read_jsonl(self.path):
            k = key(rec)
            if k in self.records:
                raise InputError(f"{self.path}:{lineno}: duplicate record key {k!r}")
            self.records[k] = rec

    def _repair(self) -> int:
        """Cut everything after the last newline (a record torn by a crash)."""
        fh = self._fh
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        if size == 0:
            return 0
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        # find the last newline
        pos = size
        block = 4096
        cut = 0
        while pos > 0:
            start = max(0, pos - block)
            fh.seek(start)
            chunk = fh.read(pos - start)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                cut = start + idx + 1
                break
            pos = start
        fh.truncate(cut)
        fh.flush()
        os.fsync(fh.fileno())
        return size - cut

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: dict[str, Any]) -> None:
        k = self.key(record)
        line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        with self._lock:
            if k in self.records:
                raise SelfRewardError(f"{self.path}: record {k!r} is already written")
            self._fh.seek(0, os.SEEK_END)
            self._fh.write(line)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self.records[k] = record

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
                self._fh.close()

    def __enter__(self) -> ResumableJsonl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------ manifests


def write_manifest(path: str | Path, data: dict[str, Any]) -> Path:
    body = {"written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **data}
    return atomic_write_json(path, body)


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: manifest is not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: manifest must be a JSON object")
    return data


# ------------------------------------------------------------------ layout


@dataclass(frozen=True)
class RunLayout:
    """Where a run's artifacts live under the artifact root.

    runs/<run>/config.yaml, seed/, iter-<t>/{prompts,candidates,judgments,pairs}.jsonl
    (+ <stage>.manifest.json), models/<name>/ (adapter + manifest.json), eval/, logs/.
    """

    root: Path
    run: str

    @property
    def run_dir(self) -> Path:
        return self.root / "runs" / self.run

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def seed_dir(self) -> Path:
        return self.run_dir / "seed"

    @property
    def models_dir(self) -> Path:
        return self.run_dir / "models"

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / "eval"

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def cache_dir(self) -> Path:
        """Shared across runs: prepared base models, keyed by content hash."""
        return self.root / "cache"

    def stage_log(self, t: int, stage: str, attempt: int) -> Path:
        """What the worker printed for one attempt of stage (t, stage) (distributed mode)."""
        return self.logs_dir / f"iter-{t}" / f"{stage}.{attempt}.log"

    def iter_dir(self, t: int) -> Path:
        return self.run_dir / f"iter-{t}"

    def stage_file(self, t: int, stage: str) -> Path:
        return self.iter_dir(t) / f"{stage}.jsonl"

    def stage_manifest(self, t: int, stage: str) -> Path:
        return self.iter_dir(t) / f"{stage}.manifest.json"

    def stage_progress(self, t: int, stage: str) -> Path:
        """The embedded mode's live progress of a running stage (selfreward.progress.file_sink)."""
        return self.iter_dir(t) / f"{stage}.progress.json"

    def stage_error(self, t: int, stage: str) -> Path:
        """Why the last attempt of a stage failed in the embedded mode (stage, record, message)."""
        return self.iter_dir(t) / f"{stage}.error.json"

    def model_dir(self, name: str) -> Path:
        return self.models_dir / name

    def model_manifest(self, name: str) -> Path:
        return self.model_dir(name) / "manifest.json"
