"""The data browser: pages of an iteration's files, never a whole large JSONL in memory.

Pages are addressed by byte offsets: `read_page(path, offset, limit)` seeks to `offset` (the
start of a line, as an earlier page's `next_offset` is) and reads lines until it has `limit`
records, at most `MAX_SCAN_BYTES` when it filters; the answer says where the next page starts.
Records of a prompt in another file (its candidates, their judgments, its pair) are found by an
index of byte offsets per key (`KeyIndex`: built by one streaming pass over the file, kept while
the file's size and mtime stay the same), then read by seeking to each.

`prompt_page` joins them: prompts (or pairs) -> their N candidates with scores and the judge's
verdict texts -> the chosen/rejected pair. `eval_page`: an evaluation's head-to-head examples,
A's and B's answers side by side with both orders' verdicts.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from selfreward.dashboard.files import OutsideRun, confined, confined_name
from selfreward.storage import RunLayout

MAX_LIMIT = 200
MAX_SCAN_BYTES = 8 << 20  # a filtered page stops scanning after this much and says where it got
MAX_TEXT = 20_000  # characters of one text field shown in a page


class BadOffset(ValueError):
    pass


@dataclass
class Page:
    records: list[dict[str, Any]]
    offset: int
    next_offset: int | None  # None: the end of the file
    size: int
    bytes_read: int
    offsets: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "next_offset": self.next_offset,
            "size": self.size,
            "bytes_read": self.bytes_read,
            "records": self.records,
            "offsets": self.offsets,
        }


def _check_offset(fh: Any, offset: int, size: int) -> None:
    if offset < 0 or offset > size:
        raise BadOffset(f"offset {offset} is outside the file (size {size})")
    if offset > 0:
        fh.seek(offset - 1)
        if fh.read(1) != b"\n":
            raise BadOffset(f"offset {offset} is not the start of a line")


def iter_lines(path: Path, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) from `offset` on; the file is read a line at a time."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        _check_offset(fh, offset, size)
        fh.seek(offset)
        pos = offset
        for line in fh:
            yield pos, line
            pos += len(line)


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def read_page(
    path: Path,
    offset: int = 0,
    limit: int = 50,
    keep: Callable[[dict[str, Any], bytes], bool] | None = None,
    max_scan_bytes: int = MAX_SCAN_BYTES,
) -> Page:
    """Up to `limit` records from byte `offset` on (those `keep` accepts), reading line by line."""
    limit = max(1, min(limit, MAX_LIMIT))
    size = path.stat().st_size
    records: list[dict[str, Any]] = []
    offsets: list[int] = []
    read = 0
    next_offset: int | None = None
    for pos, line in iter_lines(path, offset):
        read += len(line)
        if not line.endswith(b"\n"):
            break  # a line being written: not a record yet
        rec = _parse(line)
        if rec is not None and (keep is None or keep(rec, line)):
            records.append(rec)
            offsets.append(pos)
        if len(records) >= limit or (keep is not None and read >= max_scan_bytes):
            next_offset = pos + len(line) if pos + len(line) < size else None
            break
    return Page(records, offset, next_offset, size, read, offsets)


def read_at(path: Path, offset: int) -> dict[str, Any] | None:
    """The record of the line starting at `offset`."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        return _parse(fh.readline())


class KeyIndex:
    """Byte offsets of a JSONL file's lines by a key field (one streaming pass, cached)."""

    _cache: ClassVar[dict[tuple[str, str], tuple[tuple[int, int], dict[str, list[int]]]]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def of(cls, path: Path, key: str) -> dict[str, list[int]]:
        if not path.is_file():
            return {}
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns)
        cache_key = (str(path), key)
        with cls._lock:
            hit = cls._cache.get(cache_key)
            if hit is not None and hit[0] == stamp:
                return hit[1]
        index: dict[str, list[int]] = {}
        for pos, line in iter_lines(path):
            if not line.endswith(b"\n"):
                break
            rec = _parse(line)
            if rec is not None and rec.get(key) is not None:
                index.setdefault(str(rec[key]), []).append(pos)
        with cls._lock:
            if len(cls._cache) > 64:
                cls._cache.clear()
            cls._cache[cache_key] = (stamp, index)
        return index


def _clip(text: Any) -> Any:
    if isinstance(text, str) and len(text) > MAX_TEXT:
        return text[:MAX_TEXT] + f"... [{len(text) - MAX_TEXT} more characters]"
    return text


def _content(messages: Any) -> str:
    if isinstance(messages, list):
        return "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    return str(messages or "")


def margin_of(pair: dict[str, Any]) -> float | None:
    a, b = pair.get("chosen_score"), pair.get("rejected_score")
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) - float(b)
    return None


@dataclass(frozen=True)
class DataQuery:
    view: str = "pairs"  # pairs: pairs.jsonl in order; prompts: prompts.jsonl in order
    offset: int = 0
    limit: int = 20
    q: str | None = None  # text search (case-insensitive) in the prompt, answers and pair
    filter: str | None = None  # dropped: prompts without a pair; parse_failures: a verdict failed
    min_margin: float | None = None


def _candidates(layout: RunLayout, t: int, prompt_id: str) -> list[dict[str, Any]]:
    cand_path = layout.stage_file(t, "candidates")
    judg_path = layout.stage_file(t, "judgments")
    by_prompt = KeyIndex.of(cand_path, "prompt_id")
    by_id = KeyIndex.of(judg_path, "id")
    out = []
    for pos in by_prompt.get(prompt_id, []):
        c = read_at(cand_path, pos) or {}
        j = None
        for jpos in by_id.get(str(c.get("id")), [])[-1:]:
            j = read_at(judg_path, jpos)
        out.append(
            {
                "id": c.get("id"),
                "index": c.get("index"),
                "model": c.get("model"),
                "text": _clip(c.get("text")),
                "finish_reason": c.get("finish_reason"),
                "teacher": bool(c.get("teacher")),
                "anchor": bool(c.get("anchor")),
                "score": None if j is None else j.get("score"),
                "failures": 0 if j is None else int(j.get("failures") or 0),
                "judge": None if j is None else j.get("judge"),
                "verdicts": []
                if j is None
                else [
                    {"text": _clip(v.get("text")), "score": v.get("score"), "failure": v.get("failure")}
                    for v in j.get("verdicts") or []
                ],
            }
        )
    out.sort(key=lambda c: (c["index"] is None, c["index"] if c["index"] is not None else 0))
    return out


def _pair_view(pair: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt": _clip(_content(pair.get("prompt"))),
        "chosen": _clip(_content(pair.get("chosen"))),
        "rejected": _clip(_content(pair.get("rejected"))),
        "chosen_score": pair.get("chosen_score"),
        "rejected_score": pair.get("rejected_score"),
        "chosen_id": pair.get("chosen_id"),
        "rejected_id": pair.get("rejected_id"),
        "kind": pair.get("kind"),
        "margin": margin_of(pair),
    }


def prompt_page(layout: RunLayout, t: int, query: DataQuery) -> dict[str, Any]:
    """One page of the data browser of iteration t (see the module docstring)."""
    pairs_path = layout.stage_file(t, "pairs")
    prompts_path = layout.stage_file(t, "prompts")
    needle = query.q.lower() if query.q else None
    pair_index = KeyIndex.of(pairs_path, "prompt_id") if query.view == "prompts" else {}

    def joined(rec: dict[str, Any]) -> dict[str, Any]:
        if query.view == "pairs":
            pid = str(rec.get("prompt_id"))
            pair: dict[str, Any] | None = rec
            prompt = _content(rec.get("prompt"))
        else:
            pid = str(rec.get("id"))
            at = pair_index.get(pid)
            pair = read_at(pairs_path, at[0]) if at else None
            prompt = str(rec.get("prompt", ""))
        return {
            "prompt_id": pid,
            "prompt": _clip(prompt),
            "pair": None if pair is None else _pair_view(pair),
            "candidates": _candidates(layout, t, pid),
        }

    def keep(rec: dict[str, Any], line: bytes) -> bool:
        if query.view == "pairs" and query.min_margin is not None:
            m = margin_of(rec)
            if m is None or m < query.min_margin:
                return False
        if query.view == "prompts" and query.filter == "dropped" and str(rec.get("id")) in pair_index:
            return False
        if query.filter == "parse_failures" or needle:
            item = joined(rec)
            if query.filter == "parse_failures" and not any(c["failures"] for c in item["candidates"]):
                return False
            if needle:
                texts = [item["prompt"], *(c["text"] or "" for c in item["candidates"])]
                if item["pair"]:
                    texts += [item["pair"]["chosen"], item["pair"]["rejected"]]
                if not any(needle in str(x).lower() for x in texts):
                    return False
        return True

    path = pairs_path if query.view == "pairs" else prompts_path
    if not path.is_file():
        return {
            "view": query.view,
            "file": path.name,
            "items": [],
            "offset": 0,
            "next_offset": None,
            "size": 0,
            "bytes_read": 0,
            "missing": True,
        }
    filtering = bool(needle or query.filter or query.min_margin is not None)
    page = read_page(path, query.offset, query.limit, keep if filtering else None)
    items = [joined(r) for r in page.records]
    return {"view": query.view, "file": path.name, "items": items, **_page_fields(page)}


def _page_fields(page: Page) -> dict[str, Any]:
    d = page.as_dict()
    d.pop("records")
    return d


def file_page(layout: RunLayout, t: int, name: str, offset: int, limit: int, q: str | None) -> dict[str, Any]:
    """A page of any JSONL file of iteration t's folder (by its name), raw records."""
    path = confined_name(layout.iter_dir(t), name)
    if path.suffix != ".jsonl" or not path.is_file():
        raise FileNotFoundError(name)
    needle = q.lower().encode() if q else None
    keep = (lambda _r, line: needle in line.lower()) if needle else None
    page = read_page(path, offset, limit, keep)
    return {"file": name, **page.as_dict()}


def eval_files(layout: RunLayout, t: int) -> list[str]:
    d = confined(layout.run_dir, "eval", f"iter-{t}")
    return sorted(p.name for p in d.glob("verdicts-*.jsonl")) if d.is_dir() else []


def eval_page(layout: RunLayout, t: int, name: str | None, offset: int, limit: int) -> dict[str, Any]:
    """Head-to-head examples of iteration t's evaluation: both answers and both orders' verdicts."""
    files = eval_files(layout, t)
    if not files:
        return {"files": [], "items": [], "next_offset": None, "offset": 0}
    name = name or files[0]
    if name not in files:
        raise FileNotFoundError(name)
    eval_dir = confined(layout.run_dir, "eval", f"iter-{t}")
    path = confined_name(eval_dir, name)
    a_name, _, b_name = name.removeprefix("verdicts-").removesuffix(".jsonl").partition("-vs-")
    answers_dirs = [confined(layout.run_dir, "eval", "answers"), eval_dir]

    def answers_of(side: str) -> tuple[Path | None, dict[str, list[int]]]:
        for d in answers_dirs:
            try:
                p = confined_name(d, f"answers-{side}.jsonl")
            except OutsideRun:
                return None, {}
            if p.is_file():
                return p, KeyIndex.of(p, "prompt_id")
        return None, {}

    (pa, ia), (pb, ib) = answers_of(a_name), answers_of(b_name)
    page = read_page(path, offset, limit)
    items = []
    for v in page.records:
        pid = str(v.get("prompt_id"))
        ra = read_at(pa, ia[pid][-1]) if pa and pid in ia else None
        rb = read_at(pb, ib[pid][-1]) if pb and pid in ib else None
        items.append(
            {
                "prompt_id": pid,
                "instruction": _clip((ra or rb or {}).get("instruction")),
                "a": a_name,
                "b": b_name,
                "answer_a": _clip((ra or {}).get("output")),
                "answer_b": _clip((rb or {}).get("output")),
                "preference": v.get("preference"),
                "identical": v.get("identical"),
                "failure": v.get("failure"),
                "ab": {k: _clip(x) for k, x in (v.get("ab") or {}).items()},
                "ba": {k: _clip(x) for k, x in (v.get("ba") or {}).items()},
            }
        )
    return {"files": files, "file": name, "items": items, **_page_fields(page)}
