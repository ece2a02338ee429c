"""prepare_seed: filters, the split, both input formats, determinism, idempotency, empty results."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfreward.config import DataConfig
from selfreward.data import prepare_seed, split_key
from selfreward.data.seed import MANIFEST_FILE, OUTPUT_FILES
from selfreward.data.split import is_eval
from selfreward.errors import EmptyResultError
from selfreward.schemas import EFTEvalRecord, EFTTrainRecord, IFTRecord, read_records
from selfreward.storage import load_jsonl

# ------------------------------------------------------------------ helpers


def reply(mid: str, rank: int | None, text: str | None = None, *children: dict[str, Any], **kw: Any) -> dict:
    m = {"message_id": mid, "text": text or f"answer {mid}", "role": "assistant", "lang": "en", "rank": rank}
    return {**m, "review_result": True, "deleted": False, "synthetic": False, **kw, "replies": list(children)}


def tree(tid: str, *replies: dict[str, Any], text: str | None = None, **kw: Any) -> dict[str, Any]:
    prompt = {"message_id": tid, "text": text or f"question {tid}?", "role": "prompter", "lang": "en"}
    prompt = {**prompt, "review_result": True, "deleted": False, "synthetic": False, **kw}
    return {
        "message_tree_id": tid,
        "tree_state": "ready_for_export",
        "prompt": {**prompt, "replies": list(replies)},
    }


def good_tree(tid: str, n: int = 3) -> dict[str, Any]:
    return tree(tid, *(reply(f"{tid}-r{i}", i) for i in range(n)))


def write_trees(path: Path, trees: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in trees), encoding="utf-8")
    return path


def to_message_rows(trees_file: Path) -> list[dict[str, Any]]:
    """Flatten a trees export into the hub's per-message rows (float ranks, emoji structs)."""
    rows: list[dict[str, Any]] = []
    for line in trees_file.read_text(encoding="utf-8").splitlines():
        t = json.loads(line)

        def walk(m: dict[str, Any], parent: str | None, t: dict[str, Any] = t) -> None:
            emojis = m.get("emojis")
            rows.append(
                {
                    "message_id": m["message_id"], "parent_id": parent, "user_id": "u-" + m["message_id"][:4],
                    "created_date": "2023-02-05T10:00:00+00:00", "text": m["text"], "role": m["role"],
                    "lang": m["lang"], "review_count": m.get("review_count", 0),
                    "review_result": m.get("review_result"), "deleted": m.get("deleted", False),
                    "rank": None if m.get("rank") is None else float(m["rank"]),
                    "synthetic": m.get("synthetic", False), "model_name": m.get("model_name"),
                    "detoxify": None, "message_tree_id": t["message_tree_id"], "tree_state": t["tree_state"],
                    "emojis": {"name": list(emojis), "count": list(emojis.values())} if emojis else None,
                    "labels": None,
                }
            )  # fmt: skip
            for child in m.get("replies", []):
                walk(child, m["message_id"])

        walk(t["prompt"], None)
    return rows


def outputs(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in OUTPUT_FILES}


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST_FILE).read_text())


# ------------------------------------------------------------------ the demo set


def test_demo_set_every_filter_fires_and_files_are_consistent(tmp_path: Path) -> None:
    m = prepare_seed(DataConfig(source="demo"), tmp_path)
    fired = {k for k, v in m.dropped.items() if v}
    for reason in (
        "tree.later_turn", "prompt.role", "prompt.deleted", "prompt.review_failed", "prompt.synthetic",
        "prompt.empty_text", "prompt.lang", "reply.role", "reply.deleted", "reply.review_failed",
        "reply.synthetic", "reply.empty_text", "reply.lang", "reply.unranked", "ift.no_rank0_reply",
        "eft.fewer_than_2_ranks",
    ):  # fmt: skip
        assert reason in fired, reason
    ift = read_records(tmp_path / "ift.jsonl", IFTRecord)
    eft_train = read_records(tmp_path / "eft_train.jsonl", EFTTrainRecord)
    eft_eval = read_records(tmp_path / "eft_eval.jsonl", EFTEvalRecord)
    assert len(ift) >= 25 and len(eft_train) >= 60 and len(eft_eval) >= 3  # non-empty eval at the defaults
    assert m.counts["ift"] == len(ift) and m.outputs["eft_eval.jsonl"].records == len(eft_eval)
    # IFT and EFT-eval never share a tree; EFT-train comes from train trees
    assert not {r.tree_id for r in ift} & {r.tree_id for r in eft_eval}
    assert not {r.tree_id for r in eft_train} & {r.tree_id for r in eft_eval}
    assert all(is_eval("selfreward-split-v1", r.tree_id, 0.2) for r in eft_eval)
    assert not any(is_eval("selfreward-split-v1", r.tree_id, 0.2) for r in ift)
    # only first-turn English prompts; follow-up prompter turns never become prompts
    roots = {
        json.loads(line)["prompt"]["text"] for line in Path(m.source["description"]).read_text().splitlines()
    }
    assert {r.prompt for r in ift} <= roots and {r.prompt for r in eft_train} <= roots
    assert "When would I use a named tuple instead?" not in {r.prompt for r in ift}
    assert all(r.lang == "en" for r in ift)
    # every EFT-train row: a score from the rank mapping and its templated justification
    by_prompt: dict[str, list[EFTTrainRecord]] = {}
    for r in eft_train:
        by_prompt.setdefault(r.prompt_id or "", []).append(r)
    for rows in by_prompt.values():
        rows.sort(key=lambda r: r.human_rank or 0)
        assert rows[0].score == 5 and rows[-1].score == 2
        assert [r.score for r in rows] == sorted((r.score for r in rows), reverse=True)
    # EFT-eval keeps the human ranks as published, best first
    for r in eft_eval:
        ranks = [x.rank for x in r.replies]
        assert ranks == sorted(ranks) and len(set(ranks)) >= 2


def test_rerun_is_byte_identical_and_reuses_a_finished_folder(tmp_path: Path) -> None:
    config = DataConfig(source="demo")
    first = prepare_seed(config, tmp_path / "a")
    assert not first.reused
    second = prepare_seed(config, tmp_path / "b")
    assert outputs(tmp_path / "a") == outputs(tmp_path / "b")
    ma, mb = manifest(tmp_path / "a"), manifest(tmp_path / "b")
    ma.pop("written_at"), mb.pop("written_at")
    assert ma == mb
    assert second.outputs == first.outputs
    # same folder, same input and settings: nothing runs, nothing is rewritten
    stamp = (tmp_path / "a" / "ift.jsonl").stat().st_mtime_ns
    again = prepare_seed(config, tmp_path / "a")
    assert again.reused and again.counts == first.counts
    assert (tmp_path / "a" / "ift.jsonl").stat().st_mtime_ns == stamp
    # a changed setting, a damaged output, or --force: rebuilt
    assert not prepare_seed(DataConfig(source="demo", max_ift=5), tmp_path / "a").reused
    assert len(load_jsonl(tmp_path / "a" / "ift.jsonl")) == 5
    assert not prepare_seed(config, tmp_path / "a").reused
    (tmp_path / "a" / "eft_eval.jsonl").write_text("")
    assert not prepare_seed(config, tmp_path / "a").reused
    assert outputs(tmp_path / "a") == outputs(tmp_path / "b")
    assert not prepare_seed(config, tmp_path / "a", force=True).reused
    # eft_in_sft only matters to the trainer: it does not invalidate the folder
    assert prepare_seed(DataConfig(source="demo", eft_in_sft=False), tmp_path / "a").reused


# ------------------------------------------------------------------ formats


def test_trees_jsonl_parquet_and_hub_loader_give_the_same_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    trees_out = tmp_path / "from-trees"
    prepare_seed(DataConfig(source="demo"), trees_out)
    rows = to_message_rows(Path(manifest(trees_out)["source"]["description"]))
    random.Random(0).shuffle(rows)  # the per-message files list messages in any order
    jsonl = tmp_path / "messages.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    parquet = tmp_path / "messages.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    # a local folder laid out like the hub's repo, read through datasets.load_dataset
    hub = tmp_path / "oasst1" / "data"
    hub.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:100]), hub / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[100:]), hub / "validation-00000-of-00001.parquet")
    expected = outputs(trees_out)
    for name, source in (("jsonl", str(jsonl)), ("parquet", str(parquet)), ("hub", f"hf:{hub.parent}")):
        m = prepare_seed(DataConfig(source=source), tmp_path / name)
        assert m.source["format"] == "messages", name
        assert outputs(tmp_path / name) == expected, name
        assert m.counts == manifest(trees_out)["counts"], name
    hub_manifest = manifest(tmp_path / "hub")
    assert "validation" in hub_manifest["source"]["description"]
    # the hub source is hashed by its fingerprints: a second run is found up to date
    assert prepare_seed(DataConfig(source=f"hf:{hub.parent}"), tmp_path / "hub").reused


def test_shared_oasst_trees_and_their_per_message_form(shared_data: Path, tmp_path: Path) -> None:
    trees_file = shared_data / "oasst1" / "en_100_tree.jsonl"
    if not trees_file.is_file():
        pytest.skip(f"{trees_file} is absent (optional real-data test)")
    m = prepare_seed(DataConfig(source=str(trees_file)), tmp_path / "trees")
    assert m.counts["first_turn_prompts"] == 100
    assert m.counts["ift"] >= 50 and m.counts["eft_train"] >= 150 and m.counts["eft_eval"] >= 5
    assert m.dropped["prompt.synthetic"] > 0  # the export holds a few model-written trees
    parquet = tmp_path / "oasst.parquet"
    pq.write_table(pa.Table.from_pylist(to_message_rows(trees_file)), parquet)
    prepare_seed(DataConfig(source=str(parquet)), tmp_path / "parquet")
    assert outputs(tmp_path / "trees") == outputs(tmp_path / "parquet")


# ------------------------------------------------------------------ filters, one by one


def test_each_filter_drops_and_counts_its_rows(tmp_path: Path) -> None:
    trees = [
        good_tree("ok-1"),
        good_tree("ok-2", 2),
        tree("p-role", reply("x1", 0), role="assistant"),
        tree("p-custom-role", reply("x2", 0), role="moderator"),
        tree("p-deleted", reply("x3", 0), deleted=True),
        tree("p-review", reply("x4", 0), review_result=False),
        tree("p-review-null", reply("x5", 0), review_result=None),  # null review passes
        tree("p-synth", reply("x6", 0), synthetic=True),
        tree("p-empty", reply("x7", 0), text="  \n"),
        tree("p-lang", reply("x8", 0), lang="de"),
        tree("p-lang-null", reply("x9", 0), lang=None),
        tree(
            "replies",
            reply("ra", 0),
            reply("rb", 1, None, good_tree("later")["prompt"]),  # a follow-up turn (4 messages below rb)
            {**reply("rc", 2), "role": "prompter"},
            reply("rd", 3, deleted=True),
            reply("re", 4, review_result=False),
            reply("rf", 5, synthetic=True),
            reply("rg", 6, text=" "),
            reply("rh", 7, lang="fr"),
            reply("ri", None),
            reply("rj", 8, synthetic=None, review_result=None),
        ),
        tree("no-rank0", reply("n1", 0, deleted=True), reply("n2", 1), reply("n3", 2)),
        tree("one-ranked", reply("s1", 0)),
    ]
    src = write_trees(tmp_path / "in.jsonl", trees)
    m = prepare_seed(DataConfig(source=str(src), eval_fraction=0.0), tmp_path / "out")
    d = m.dropped
    expected = {
        "prompt.role": 2, "prompt.deleted": 1, "prompt.review_failed": 1, "prompt.synthetic": 1,
        "prompt.empty_text": 1, "prompt.lang": 2, "reply.role": 1, "reply.deleted": 2, "reply.review_failed": 1,
        "reply.synthetic": 1, "reply.empty_text": 1, "reply.lang": 1, "reply.unranked": 1, "tree.later_turn": 4,
        "ift.no_rank0_reply": 1, "eft.fewer_than_2_ranks": 2,  # one-ranked, p-review-null
    }  # fmt: skip
    assert {k: d[k] for k in expected} == expected
    assert m.unknown_roles == {"moderator": 1}
    assert m.languages == {"(none)": 1, "de": 1, "en": 43, "fr": 1}
    ift = {r["id"]: r for r in load_jsonl(tmp_path / "out" / "ift.jsonl")}
    assert sorted(ift) == ["ok-1", "ok-2", "one-ranked", "p-review-null", "replies"]
    assert ift["replies"]["response_id"] == "ra"
    eft = load_jsonl(tmp_path / "out" / "eft_train.jsonl")
    rows = [r for r in eft if r["prompt_id"] == "replies"]
    # usable replies ra(0) rb(1) rj(8): three distinct ranks -> 5 3 2, the published ranks kept
    assert [(r["id"], r["human_rank"], r["score"]) for r in rows] == [
        ("ra", 0, 5),
        ("rb", 1, 3),
        ("rj", 8, 2),
    ]
    no_rank0 = [(r["human_rank"], r["score"]) for r in eft if r["prompt_id"] == "no-rank0"]
    assert no_rank0 == [(1, 5), (2, 2)]
    assert m.counts["eft_eval"] == 0 and any("eft_eval.jsonl is empty" in w for w in m.warnings)
    # several languages
    m2 = prepare_seed(DataConfig(source=str(src), eval_fraction=0.0, languages=["en", "de"]), tmp_path / "de")
    assert m2.dropped["prompt.lang"] == 1 and m2.counts["ift"] == 6


def test_caps_keep_a_reproducible_subset_in_split_hash_order(tmp_path: Path) -> None:
    src = write_trees(tmp_path / "in.jsonl", [good_tree(f"t{i:03d}") for i in range(60)])
    full = prepare_seed(DataConfig(source=str(src)), tmp_path / "full")
    capped = prepare_seed(
        DataConfig(source=str(src), max_ift=7, max_eft_train=10, max_eft_eval=2), tmp_path / "capped"
    )
    assert capped.counts["ift"] == 7 and capped.counts["eft_train"] == 10 and capped.counts["eft_eval"] == 2
    assert capped.dropped["ift.over_max"] == full.counts["ift"] - 7
    assert capped.dropped["eft_train.over_max"] == full.counts["eft_train"] - 10
    assert capped.dropped["eft_eval.over_max"] == full.counts["eft_eval"] - 2
    for name in OUTPUT_FILES:  # a cap keeps the first records of the uncapped file
        a, b = load_jsonl(tmp_path / "full" / name), load_jsonl(tmp_path / "capped" / name)
        assert a[: len(b)] == b
    keys = [
        split_key("selfreward-split-v1", r["tree_id"]) for r in load_jsonl(tmp_path / "full" / "ift.jsonl")
    ]
    assert keys == sorted(keys)


# ------------------------------------------------------------------ the split


def test_split_is_a_pinned_salted_hash() -> None:
    # pinned values: the split must not change across runs, machines or Python versions
    assert split_key("selfreward-split-v1", "054e1df3-35e0-4bb8-a585-607dbdcd24e0") == pytest.approx(
        0.37571039824040076, abs=1e-15
    )
    assert split_key("other-salt", "054e1df3-35e0-4bb8-a585-607dbdcd24e0") == pytest.approx(
        0.528583069776303, abs=1e-15
    )
    ids = [f"tree-{i}" for i in range(4000)]
    share = sum(is_eval("s", t, 0.2) for t in ids) / len(ids)
    assert 0.18 < share < 0.22
    # a bigger fraction only moves trees from train to eval; another salt draws another split
    small = {t for t in ids if is_eval("s", t, 0.1)}
    assert small <= {t for t in ids if is_eval("s", t, 0.3)}
    assert small != {t for t in ids if is_eval("s2", t, 0.1)}


def test_split_does_not_depend_on_input_order(tmp_path: Path) -> None:
    trees = [good_tree(f"t{i:03d}") for i in range(30)]
    a = write_trees(tmp_path / "a.jsonl", trees)
    b = write_trees(tmp_path / "b.jsonl", list(reversed(trees)))
    prepare_seed(DataConfig(source=str(a)), tmp_path / "oa")
    prepare_seed(DataConfig(source=str(b)), tmp_path / "ob")
    assert outputs(tmp_path / "oa") == outputs(tmp_path / "ob")
    eval_trees = {r["tree_id"] for r in load_jsonl(tmp_path / "oa" / "eft_eval.jsonl")}
    assert eval_trees == {f"t{i:03d}" for i in range(30) if is_eval("selfreward-split-v1", f"t{i:03d}", 0.2)}


# ------------------------------------------------------------------ empty results and bad input


@pytest.mark.parametrize(
    ("trees", "settings", "message"),
    [
        ([], {}, r"the input has no first-turn prompts \(0 messages"),
        ([good_tree("a"), good_tree("b")], {"languages": ["xx"]},
         r"the prompt filter 'lang' removed all 2 remaining first-turn prompts \(data\.languages=\['xx'\]; "
         r"first-turn languages seen: \{'en': 2\}\)"),
        ([tree("a", reply("a1", 0), deleted=True), tree("b", reply("b1", 0), lang="de")], {},
         r"the prompt filter 'lang' removed all 1 remaining"),
        ([tree("a", reply("a1", 0), deleted=True)], {}, r"the prompt filter 'deleted' removed all 1"),
        ([good_tree("a"), good_tree("b")], {"eval_fraction": 0.999999},
         r"all 2 kept prompts fell in the eval split \(data\.eval_fraction=0\.999999"),
        ([tree("a", reply("a1", 0, deleted=True), reply("a2", 1))], {"eval_fraction": 0.0},
         r"the filter 'rank-0 reply' removed all 1 train prompts: .*\{'reply\.deleted': 1\}"),
    ],
)  # fmt: skip
def test_no_ift_rows_is_an_error_naming_the_filter(
    tmp_path: Path, trees: list[dict[str, Any]], settings: dict[str, Any], message: str
) -> None:
    src = write_trees(tmp_path / "in.jsonl", trees)
    with pytest.raises(EmptyResultError, match=r"no IFT rows from .*in\.jsonl: " + message):
        prepare_seed(DataConfig(source=str(src), **settings), tmp_path / "out")
    assert not (tmp_path / "out" / MANIFEST_FILE).exists()


def test_orphans_and_cycles_in_per_message_input_are_counted(tmp_path: Path) -> None:
    rows = to_message_rows(write_trees(tmp_path / "t.jsonl", [good_tree("a"), good_tree("b")]))
    rows += [
        {**rows[1], "message_id": "lost", "parent_id": "gone"},
        {**rows[1], "message_id": "lost-child", "parent_id": "lost"},
        {**rows[0], "message_id": "c1", "parent_id": "c2"},
        {**rows[1], "message_id": "c2", "parent_id": "c1"},
    ]
    src = tmp_path / "m.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    m = prepare_seed(DataConfig(source=str(src), eval_fraction=0.0), tmp_path / "out")
    assert m.orphans == {"messages": 1, "below_orphans": 1, "examples": ["lost"]}
    assert m.cycles == {"count": 1, "messages": 2, "examples": [["c1", "c2"]]}
    assert m.dropped["tree.orphaned"] == 2 and m.dropped["tree.in_cycle"] == 2
    assert m.counts["ift"] == 2 and m.counts["messages"] == 12


def test_docs_state_the_demo_counts_and_every_drop_reason(tmp_path: Path) -> None:
    import re

    from selfreward.data.seed import CHECKS, DROP_REASONS

    docs = (Path(__file__).resolve().parent.parent / "docs" / "data.md").read_text(encoding="utf-8")
    m = prepare_seed(DataConfig(source="demo"), tmp_path)
    stated = re.search(
        r"gives (\d+) IFT rows,\s+(\d+) EFT-train rows \((\d+) prompts\) and (\d+) EFT-eval prompts", docs
    )
    assert stated is not None
    c = m.counts
    assert tuple(map(int, stated.groups())) == (
        c["ift"],
        c["eft_train"],
        c["eft_train_prompts"],
        c["eft_eval"],
    )
    for reason in DROP_REASONS:
        prefix, _, check = reason.key.partition(".")
        assert f"`{reason.key}`" in docs or (prefix in ("prompt", "reply") and check in CHECKS), reason.key
    for check in CHECKS:
        assert f"`{check}`" in docs, check
