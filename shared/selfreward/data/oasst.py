"""OASST1 readers: both published formats, into one table of messages and one forest of trees.

Formats (docs/data.md):
- per-message rows, as on the hub (`OpenAssistant/oasst1`): one message per row with
  `message_id`, `parent_id` (null for a tree's first prompt), `text`, `role`, `lang`,
  `review_result`, `deleted`, `rank`, `synthetic`, `message_tree_id`, ... Read from a local
  `.jsonl`/`.jsonl.gz`/`.parquet` file or through `datasets.load_dataset` (`hf:<repo>`);
- the trees export: one tree per line, `{"message_tree_id", "tree_state", "prompt": {...,
  "replies": [...]}}`, replies nested. Read from a local `.jsonl`/`.jsonl.gz` file.

Both become `Message`s; `build_forest` links them by `parent_id`, so every later step is the
same for both formats. Orphans (a `parent_id` that names no message) and cycles are
reported, not fatal: their messages are not part of any tree.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from selfreward.errors import ConfigError, InputError
from selfreward.progress import NULL_PROGRESS, Progress
from selfreward.storage import sha256_file, sha256_text

SourceFormat = Literal["trees", "messages"]
DEMO_SOURCE = "demo"
HF_PREFIX = "hf:"
ROLES = ("prompter", "assistant")
EXAMPLE_IDS = 5  # ids of orphans/cycles listed in the manifest


def demo_path() -> Path:
    """The shipped demo seed set (trees format), `--source demo`."""
    return Path(str(files("selfreward") / "data" / "demo" / "trees.jsonl"))


class OasstMessage(BaseModel):
    """One message as both formats publish it; unknown fields are kept but unused."""

    model_config = ConfigDict(extra="ignore")

    message_id: str
    parent_id: str | None
    text: str
    role: str
    lang: str | None
    deleted: bool | None = None
    review_result: bool | None = None
    synthetic: bool | None = None
    rank: int | None = None
    message_tree_id: str | None = None


@dataclass
class Message:
    id: str
    parent_id: str | None
    text: str
    role: str
    lang: str | None
    deleted: bool
    review_result: bool | None
    synthetic: bool
    rank: int | None
    tree_id: str | None
    where: str  # file:line (and path in a tree) for error messages
    children: list[Message] = field(default_factory=list)


@dataclass
class Forest:
    """Trees (roots in input order), and what could not be placed in one."""

    roots: list[Message]
    messages: int
    orphans: list[str]  # messages whose parent_id names no message
    orphaned: int  # orphans and every message below them
    cycles: list[list[str]]  # each cycle's message ids
    in_cycles: int  # messages on a cycle or below one


@dataclass
class Source:
    """What was read: the messages, and how to name and hash the input."""

    spec: str
    description: str
    format: SourceFormat
    sha256: str
    messages: list[Message]


@dataclass
class OpenSource:
    """An input found and hashed but not parsed yet (so a finished stage can be recognised cheaply)."""

    spec: str
    description: str
    sha256: str
    total: int | None  # records, where known before reading
    records: Callable[[], Iterator[tuple[str, dict[str, Any]]]]  # (where, record)

    def read(self, progress: Progress = NULL_PROGRESS) -> Source:
        label = Path(self.description).name if not self.spec.startswith(HF_PREFIX) else self.spec
        fmt, messages = _messages(self.records(), progress, label, self.total)
        return Source(self.spec, self.description, fmt, self.sha256, messages)


# ------------------------------------------------------------------ one message


def _message(raw: dict[str, Any], where: str) -> Message:
    if not raw.get("message_id"):
        raise InputError(f"{where}: missing required field 'message_id'")
    try:
        m = OasstMessage.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        name = ".".join(str(p) for p in e["loc"])
        problem = (
            f"missing required field {name!r}"
            if e["type"] == "missing"
            else f"field {name!r}: {e['msg']} (got {e.get('input')!r})"
        )
        more = f" (+{len(err.errors()) - 1} more problems)" if len(err.errors()) > 1 else ""
        raise InputError(f"{where}: message {raw['message_id']}: {problem}{more}") from None
    return Message(
        id=m.message_id,
        parent_id=m.parent_id or None,
        text=m.text,
        role=m.role,
        lang=m.lang,
        deleted=bool(m.deleted),
        review_result=m.review_result,
        synthetic=bool(m.synthetic),
        rank=m.rank,
        tree_id=m.message_tree_id,
        where=where,
    )


def _flatten_tree(tree: dict[str, Any], where: str) -> Iterator[Message]:
    """Messages of one trees-export line; parents come from the nesting."""
    prompt = tree.get("prompt")
    if not isinstance(prompt, dict):
        raise InputError(f"{where}: missing required field 'prompt' (a trees-export line)")
    tree_id = tree.get("message_tree_id")
    stack: list[tuple[dict[str, Any], str | None, str]] = [(prompt, None, "prompt")]
    while stack:
        raw, parent, path = stack.pop()
        if not isinstance(raw, dict):
            raise InputError(f"{where}: {path} is not a message object")
        replies = raw.get("replies") or []
        if not isinstance(replies, list):
            raise InputError(f"{where}: {path}.replies must be a list")
        fields = {k: v for k, v in raw.items() if k != "replies"}
        fields["parent_id"] = parent
        fields.setdefault("message_tree_id", tree_id)
        msg = _message(fields, f"{where} ({path})")
        yield msg
        for i in reversed(range(len(replies))):
            stack.append((replies[i], msg.id, f"{path}.replies[{i}]"))


def _detect(record: dict[str, Any], where: str) -> SourceFormat:
    if "prompt" in record and "message_id" not in record:
        return "trees"
    if "message_id" in record or "parent_id" in record:
        return "messages"
    raise InputError(
        f"{where}: neither an OASST message (needs 'message_id') nor a trees-export line (needs 'prompt')"
    )


# ------------------------------------------------------------------ local files


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def _parquet_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise InputError(f"{path}: not a readable parquet file ({exc})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", record


def _messages(
    records: Iterator[tuple[str, dict[str, Any]]], progress: Progress, label: str, total: int | None
) -> tuple[SourceFormat, list[Message]]:
    fmt: SourceFormat | None = None
    out: list[Message] = []
    with progress.task(f"read {label}", total) as task:
        for where, record in records:
            kind = _detect(record, where)
            if fmt is None:
                fmt = kind
            elif kind != fmt:
                raise InputError(f"{where}: a {kind} record in a file of {fmt} records")
            if kind == "trees":
                out.extend(_flatten_tree(record, where))
            else:
                out.append(_message(record, where))
            task.advance(1, messages=len(out))
    return fmt or "messages", out


def open_local(path: Path, spec: str | None = None) -> OpenSource:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    name = path.name.removesuffix(".gz")
    total: int | None = None
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            total = pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise InputError(f"{path}: not a readable parquet file ({exc})") from None
        records = functools.partial(_parquet_records, path)
    elif name.endswith((".jsonl", ".json")):
        records = functools.partial(_jsonl_records, path)
    else:
        raise InputError(f"{path}: unknown file type (expected .jsonl, .jsonl.gz or .parquet)")
    return OpenSource(spec or str(path), str(path), sha256_file(path), total, records)


# ------------------------------------------------------------------ the hub


def open_hf(spec: str) -> OpenSource:
    """`hf:<repo>[@<revision>]` through `datasets.load_dataset`: every split, per-message rows.

    A local folder of parquet/jsonl files works too (`hf:/path/to/folder`), the same call. The
    input hash is that of the loaded splits' fingerprints (known without reading the rows).
    """
    import datasets

    name = spec.removeprefix(HF_PREFIX)
    repo, _, revision = name.partition("@")
    if not repo:
        raise ConfigError([f"data.source: {spec!r} names no dataset (expected hf:<repo>[@<revision>])"])
    try:
        loaded = datasets.load_dataset(repo, revision=revision or None)
    except Exception as exc:  # the hub and the builders raise many types; name the source
        raise InputError(f"{spec}: could not load the dataset ({type(exc).__name__}: {exc})") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    splits = sorted(loaded)
    fingerprints = {s: loaded[s]._fingerprint for s in splits}

    def records() -> Iterator[tuple[str, dict[str, Any]]]:
        for split in splits:
            row = 0
            for table in loaded[split].with_format("arrow").iter(batch_size=4096):
                for record in table.to_pylist():
                    row += 1
                    yield f"{spec}[{split}]:row {row}", record

    digest = sha256_text(json.dumps({"spec": spec, "fingerprints": fingerprints}, sort_keys=True))
    total = sum(loaded[s].num_rows for s in splits)
    return OpenSource(spec, f"{spec} (splits {', '.join(splits)})", digest, total, records)


def open_source(spec: str) -> OpenSource:
    """`demo`, `hf:<repo>[@<revision>]`, or a local file (trees or per-message format)."""
    if spec == DEMO_SOURCE:
        return open_local(demo_path(), spec=DEMO_SOURCE)
    if spec.startswith(HF_PREFIX):
        return open_hf(spec)
    return open_local(Path(spec).expanduser())


def read_source(spec: str, progress: Progress = NULL_PROGRESS) -> Source:
    return open_source(spec).read(progress)


# ------------------------------------------------------------------ trees


def build_forest(messages: list[Message]) -> Forest:
    """Link messages by parent_id; report orphans and cycles (not fatal).

    A duplicated message_id is an error (naming both places): which copy is meant cannot
    be known. Children keep their input order.
    """
    by_id: dict[str, Message] = {}
    for m in messages:
        m.children = []
        first = by_id.get(m.id)
        if first is not None:
            raise InputError(f"{m.where}: message {m.id}: duplicate message_id (first at {first.where})")
        by_id[m.id] = m
    roots: list[Message] = []
    orphans: list[str] = []
    for m in messages:
        if m.parent_id is None:
            roots.append(m)
        elif m.parent_id in by_id:
            by_id[m.parent_id].children.append(m)
        else:
            orphans.append(m.id)
    # a message is placed when its chain of parents reaches a root
    state: dict[str, str] = {}  # id -> "root" | "orphan" | "cycle"
    cycles: list[list[str]] = []
    for m in messages:
        chain: list[Message] = []
        on_chain: set[str] = set()
        cur: Message | None = m
        verdict = ""
        while cur is not None:
            if cur.id in state:
                verdict = state[cur.id]
                break
            if cur.id in on_chain:
                start = next(i for i, c in enumerate(chain) if c.id == cur.id)
                cycles.append(sorted(c.id for c in chain[start:]))
                verdict = "cycle"
                break
            chain.append(cur)
            on_chain.add(cur.id)
            if cur.parent_id is None:
                verdict = "root"
                break
            parent = by_id.get(cur.parent_id)
            if parent is None:
                verdict = "orphan"
                break
            cur = parent
        for c in chain:
            state[c.id] = verdict
    states = list(state.values())
    cycles.sort()
    return Forest(
        roots=roots,
        messages=len(messages),
        orphans=orphans,
        orphaned=states.count("orphan"),
        cycles=cycles,
        in_cycles=states.count("cycle"),
    )


def tree_id(root: Message) -> str:
    """A tree's id: its `message_tree_id` (OASST sets it to the first prompt's id), else that id."""
    return root.tree_id or root.id
