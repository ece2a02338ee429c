from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from selfreward.errors import InputError, SelfRewardError
from selfreward.prompts import JUDGE_TEMPLATE, load_template
from selfreward.storage import (
    ResumableJsonl,
    atomic_dir,
    atomic_write_json,
    load_jsonl,
    read_jsonl,
    sha256_dir,
    write_jsonl_atomic,
)


def test_atomic_write_leaves_no_temp_and_replaces(tmp_path: Path) -> None:
    p = tmp_path / "a" / "m.json"
    atomic_write_json(p, {"x": 1})
    atomic_write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert [f.name for f in p.parent.iterdir()] == ["m.json"]


def test_atomic_dir_only_appears_when_complete(tmp_path: Path) -> None:
    final = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "w.bin").write_bytes(b"x")
        raise RuntimeError("crash")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "w.bin").write_bytes(b"x")
    assert (final / "w.bin").read_bytes() == b"x"


def test_read_jsonl_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "r.jsonl"
    p.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(InputError, match=r"r.jsonl:3: not valid JSON"):
        load_jsonl(p)
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(InputError, match=r"r.jsonl:2: expected a JSON object"):
        list(read_jsonl(p))
    with pytest.raises(InputError, match="file not found"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_resumable_jsonl_cuts_torn_line_and_skips_done(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl"
    with ResumableJsonl(p, key=lambda r: r["id"]) as out:
        out.append({"id": "a", "v": 1})
        out.append({"id": "b", "v": 2})
    with open(p, "ab") as fh:  # a crash in the middle of the third record
        fh.write(b'{"id": "c", "v"')
    with ResumableJsonl(p, key=lambda r: r["id"]) as out:
        assert out.torn_bytes > 0
        assert set(out.records) == {"a", "b"} and "c" not in out
        out.append({"id": "c", "v": 3})
        with pytest.raises(SelfRewardError, match="already written"):
            out.append({"id": "a", "v": 9})
    assert [r["id"] for r in load_jsonl(p)] == ["a", "b", "c"]


def test_resumable_jsonl_refuses_second_writer(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl"
    with ResumableJsonl(p, key=lambda r: r["id"]), pytest.raises(SelfRewardError, match="another process"):
        ResumableJsonl(p, key=lambda r: r["id"])


def _writer(path: str) -> None:
    out = ResumableJsonl(path, key=lambda r: r["id"])
    i = len(out)
    while True:
        out.append({"id": str(i), "payload": "x" * 2000})
        i += 1


def test_killed_writer_loses_nothing_written(tmp_path: Path) -> None:
    """SIGKILL a process appending records: every complete line survives and reopens cleanly."""
    p = tmp_path / "k.jsonl"
    proc = mp.get_context("fork").Process(target=_writer, args=(str(p),))
    proc.start()
    deadline = time.time() + 20
    while time.time() < deadline and (not p.exists() or p.stat().st_size < 200_000):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    with ResumableJsonl(p, key=lambda r: r["id"]) as out:
        n = len(out)
        assert n > 50
        assert set(out.records) == {str(i) for i in range(n)}


def test_write_jsonl_atomic_is_byte_identical(tmp_path: Path) -> None:
    recs = [{"b": 2, "a": "é"}, {"a": 1}]
    write_jsonl_atomic(tmp_path / "1.jsonl", recs)
    write_jsonl_atomic(tmp_path / "2.jsonl", recs)
    assert (tmp_path / "1.jsonl").read_bytes() == (tmp_path / "2.jsonl").read_bytes()


def test_sha256_dir_changes_with_content(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("1")
    h1 = sha256_dir(tmp_path)
    (tmp_path / "a.txt").write_text("2")
    assert sha256_dir(tmp_path) != h1


def test_judge_template_renders_literally() -> None:
    t = load_template(JUDGE_TEMPLATE, kind="score")
    out = t.render(instruction="Say {response} {x}", response="ok {instruction}")
    assert "User: Say {response} {x}" in out
    assert "<response>ok {instruction}</response>" in out
    assert 'Conclude with the score using the format: "Score: <total points>"' in out
    assert len(t.sha256) == 64
