"""OASST readers: both formats, every file type, bad input named precisely, orphans and cycles."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfreward.data.oasst import build_forest, demo_path, read_source, tree_id
from selfreward.errors import ConfigError, InputError


def msg(mid: str, parent: str | None, role: str = "assistant", **kw: Any) -> dict[str, Any]:
    base = {"message_id": mid, "parent_id": parent, "text": f"text of {mid}", "role": role, "lang": "en"}
    return {**base, **kw}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


TREE = {
    "message_tree_id": "t1",
    "tree_state": "ready_for_export",
    "prompt": {
        "message_id": "t1",
        "text": "Q?",
        "role": "prompter",
        "lang": "en",
        "replies": [
            {"message_id": "a1", "text": "A1", "role": "assistant", "lang": "en", "rank": 0,
             "replies": [{"message_id": "p2", "text": "more?", "role": "prompter", "lang": "en"}]},
            {"message_id": "a2", "text": "A2", "role": "assistant", "lang": "en", "rank": 1, "replies": []},
        ],
    },
}  # fmt: skip


def test_trees_format_takes_parents_from_the_nesting(tmp_path: Path) -> None:
    src = read_source(str(write_jsonl(tmp_path / "t.jsonl", [TREE])))
    assert src.format == "trees"
    parents = {m.id: m.parent_id for m in src.messages}
    assert parents == {"t1": None, "a1": "t1", "p2": "a1", "a2": "t1"}
    forest = build_forest(src.messages)
    (root,) = forest.roots
    assert tree_id(root) == "t1"
    assert [c.id for c in root.children] == ["a1", "a2"]  # input order kept
    assert [c.id for c in root.children[0].children] == ["p2"]
    assert src.sha256 and src.spec.endswith("t.jsonl")


def test_per_message_jsonl_gz_and_parquet_read_the_same(tmp_path: Path) -> None:
    rows = [
        msg("r", None, "prompter", message_tree_id="r", rank=None),
        msg("x", "r", rank=0.0),  # the hub's parquet stores ranks as floats
        msg("y", "r", rank=1.0, review_result=None, synthetic=None, deleted=False),
    ]
    plain = read_source(str(write_jsonl(tmp_path / "m.jsonl", rows)))
    gz = tmp_path / "m.jsonl.gz"
    gz.write_bytes(gzip.compress((tmp_path / "m.jsonl").read_bytes()))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    for src in (plain, read_source(str(gz)), read_source(str(tmp_path / "m.parquet"))):
        assert src.format == "messages"
        assert [(m.id, m.parent_id, m.rank, m.synthetic, m.review_result) for m in src.messages] == [
            ("r", None, None, False, None),
            ("x", "r", 0, False, None),
            ("y", "r", 1, False, None),
        ]


def test_demo_set_ships_with_the_package() -> None:
    path = demo_path()
    assert path.is_file() and path.parent.name == "demo"
    src = read_source("demo")
    assert src.spec == "demo" and src.format == "trees"
    forest = build_forest(src.messages)
    assert 40 <= len(forest.roots) <= 50
    assert not forest.orphans and not forest.cycles


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(TREE) + "\n\n" + '{"message_tree_id": "t2", "prompt": {\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.jsonl:3: not valid JSON"):
        read_source(str(p))
    p.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.jsonl:1: expected a JSON object"):
        read_source(str(p))


def test_missing_required_field_names_field_and_message_id(tmp_path: Path) -> None:
    row = msg("m-42", None, "prompter")
    del row["text"]
    p = write_jsonl(tmp_path / "m.jsonl", [msg("m-1", None, "prompter"), row])
    with pytest.raises(InputError, match=r"m\.jsonl:2: message m-42: missing required field 'text'"):
        read_source(str(p))
    # in a tree: the line, the message's path in the tree and its id
    tree = json.loads(json.dumps(TREE))
    del tree["prompt"]["replies"][1]["role"]
    p = write_jsonl(tmp_path / "t.jsonl", [tree])
    with pytest.raises(
        InputError, match=r"t\.jsonl:1 \(prompt\.replies\[1\]\): message a2: missing required field 'role'"
    ):
        read_source(str(p))
    # per-message rows must say who their parent is (null for a first prompt)
    row = msg("m-7", None, "prompter")
    del row["parent_id"]
    with pytest.raises(InputError, match=r"message m-7: missing required field 'parent_id'"):
        read_source(str(write_jsonl(tmp_path / "p.jsonl", [row])))


def test_missing_message_id_and_bad_values(tmp_path: Path) -> None:
    row = msg("", None, "prompter")
    with pytest.raises(InputError, match=r"n\.jsonl:1: missing required field 'message_id'"):
        read_source(str(write_jsonl(tmp_path / "n.jsonl", [row])))
    row = msg("m-9", None, rank="first")
    with pytest.raises(InputError, match=r"v\.jsonl:1: message m-9: field 'rank': .*integer.*'first'"):
        read_source(str(write_jsonl(tmp_path / "v.jsonl", [row])))
    with pytest.raises(InputError, match=r"x\.jsonl:1: .*trees-export line \(needs 'prompt'\)"):
        read_source(str(write_jsonl(tmp_path / "x.jsonl", [{"hello": 1}])))
    tree = {"message_tree_id": "t", "prompt": {**TREE["prompt"], "replies": "none"}}
    with pytest.raises(InputError, match=r"y\.jsonl:1: prompt\.replies must be a list"):
        read_source(str(write_jsonl(tmp_path / "y.jsonl", [tree])))


def test_mixed_formats_and_unknown_files(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "mix.jsonl", [TREE, msg("z", None, "prompter")])
    with pytest.raises(InputError, match=r"mix\.jsonl:2: a messages record in a file of trees records"):
        read_source(str(p))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(InputError, match=r"data\.csv: unknown file type"):
        read_source(str(tmp_path / "data.csv"))
    with pytest.raises(InputError, match=r"nope\.jsonl: file not found"):
        read_source(str(tmp_path / "nope.jsonl"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match=r"broken\.parquet: not a readable parquet file"):
        read_source(str(tmp_path / "broken.parquet"))
    with pytest.raises(ConfigError, match="names no dataset"):
        read_source("hf:")


def test_duplicate_message_id_names_both_places(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [msg("r", None, "prompter"), msg("a", "r"), msg("a", "r")])
    src = read_source(str(p))
    with pytest.raises(
        InputError, match=r"d\.jsonl:3: message a: duplicate message_id \(first at .*d\.jsonl:2\)"
    ):
        build_forest(src.messages)


def test_orphans_and_cycles_are_reported_not_fatal(tmp_path: Path) -> None:
    rows = [
        msg("r", None, "prompter"),
        msg("a", "r"),
        msg("o1", "missing-parent", "prompter"),  # orphan
        msg("o2", "o1"),  # below an orphan
        msg("c1", "c2", "prompter"),  # c1 <-> c2: a cycle
        msg("c2", "c1"),
        msg("c3", "c2", "prompter"),  # below the cycle
        msg("s", "s"),  # a message that is its own parent
    ]
    forest = build_forest(read_source(str(write_jsonl(tmp_path / "m.jsonl", rows))).messages)
    assert [r.id for r in forest.roots] == ["r"]
    assert forest.orphans == ["o1"] and forest.orphaned == 2
    assert forest.cycles == [["c1", "c2"], ["s"]] and forest.in_cycles == 4
    assert forest.messages == 8
