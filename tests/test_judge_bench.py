"""The judge benchmark: every published set format on small fixtures (tests/data/judge-bench, with
records missing a field or holding the wrong type), the baselines against hand-computed counts,
the metrics against hand-built verdicts, and `selfreward eval judge` end to end: baselines only,
a tiny-model judge on the real vLLM policy server (pointwise), and the wire-format Gemini fake
(pairwise, both orders)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from selfreward.cli.main import app
from selfreward.errors import ConfigError, InputError
from selfreward.evaluation.bench_sets import detect_format, load_bench_set, rewardbench_sections
from selfreward.evaluation.judge_bench import BaselineJudge, baseline_judge
from selfreward.evaluation.metrics.judge_bench import ItemVerdict, bench_metrics
from selfreward.storage import load_jsonl
from selfreward.testing.fake_gemini import FakeGemini, fake_gemini

DATA = Path(__file__).parent / "data" / "judge-bench"


def accuracy_of(bench, spec: str) -> tuple[float, int, int]:
    """(accuracy with ties half, correct, judge ties) of a baseline, computed from its picks."""
    judge = baseline_judge(spec)
    assert judge is not None
    picks = [judge.pick(i) for i in bench.items]
    correct = sum(p == i.human for p, i in zip(picks, bench.items, strict=True))
    ties = picks.count("tie")
    return (correct + 0.5 * ties) / len(picks), correct, ties


# ---------------------------------------------------------------- sets


def test_generic_set_counts_every_record() -> None:
    bench = load_bench_set(DATA / "generic.jsonl")
    assert bench.format == "generic" and bench.records == 9
    assert [i.id for i in bench.items] == ["0", "1", "2", "3"]
    assert [i.human for i in bench.items] == ["b", "a", "a", "b"]
    assert dict(bench.excluded) == {"human_tie": 1, "invalid_record": 3, "identical_responses": 1}
    assert dict(bench.coerced) == {"label": 1}  # "A"
    problems = {(p["index"], p["field"]) for p in bench.problems}
    assert problems == {("5", "label"), ("7", "(record)"), ("8", "response_b")}
    assert [i.subset for i in bench.items] == ["short", "short", "long", "long"]
    # hand computation: longer wins items 0 and 2, loses 1, ties 3 (equal lengths)
    assert accuracy_of(bench, "length:longer") == (0.625, 2, 1)
    assert accuracy_of(bench, "length:shorter") == (0.375, 1, 1)


def test_llmbar_folder_subsets_and_coerced_labels() -> None:
    bench = load_bench_set(DATA / "llmbar")
    assert bench.format == "llmbar" and bench.records == 6 and len(bench.items) == 4
    assert dict(bench.excluded) == {"invalid_record": 2}
    assert {(p["index"].split(":")[-1], p["field"]) for p in bench.problems} == {
        ("1", "label"),
        ("2", "output_2"),
    }
    assert dict(bench.coerced) == {"label": 2}  # "2" and 2.0
    assert [i.subset for i in bench.items] == ["Adversarial/Neighbor"] * 2 + ["Natural"] * 2
    assert [i.human for i in bench.items] == ["a", "b", "a", "b"]
    assert accuracy_of(bench, "length:longer") == (0.5, 2, 0)
    assert accuracy_of(bench, "length:shorter") == (0.5, 2, 0)
    one = load_bench_set(DATA / "llmbar" / "Natural" / "dataset.json")
    assert [i.subset for i in one.items] == ["Natural", "Natural"]


def test_pandalm_majority_ties_and_no_majority() -> None:
    bench = load_bench_set(DATA / "pandalm.json")
    assert bench.format == "pandalm" and bench.records == 6 and len(bench.items) == 3
    assert dict(bench.excluded) == {"human_tie": 1, "no_majority": 1, "invalid_record": 1}
    assert bench.problems[0]["field"] == "annotator1" and bench.problems[0]["index"] == "4"
    assert dict(bench.coerced) == {"annotator1": 1}
    assert bench.items[0].instruction == "Summarise the text.\n\nThe cat sat on the mat all day."
    assert [i.human for i in bench.items] == ["a", "b", "a"]
    assert accuracy_of(bench, "length:longer") == (1.0, 3, 0)
    assert accuracy_of(bench, "length:shorter") == (0.0, 0, 0)


def test_rewardbench_subsets_and_sections() -> None:
    bench = load_bench_set(DATA / "rewardbench.jsonl")
    assert bench.format == "rewardbench" and bench.records == 8 and len(bench.items) == 6
    assert dict(bench.excluded) == {"invalid_record": 2}
    assert {p["field"] for p in bench.problems} == {"chosen"}
    assert all(i.human == "a" for i in bench.items)
    assert accuracy_of(bench, "length:longer") == (4 / 6, 4, 0)
    per_subset = {
        "alpacaeval-easy": {"accuracy": 0.5, "n": 2},
        "mt-bench-hard": {"accuracy": 1.0, "n": 1},
        "math-prm": {"accuracy": 0.0, "n": 1},
        "hep-python": {"accuracy": 1.0, "n": 1},
        "xstest-should-respond": {"accuracy": 1.0, "n": 1},
    }
    sections = rewardbench_sections(per_subset)
    assert sections["Chat"]["accuracy"] == 0.5 and not sections["Chat"]["complete"]
    assert sections["Chat Hard"]["accuracy"] == 1.0 and sections["Safety"]["accuracy"] == 1.0
    assert sections["Reasoning"]["accuracy"] == pytest.approx(164 / (984 + 164))  # math-prm weighs 984


def test_mtbench_first_turn_ties_and_bad_rows() -> None:
    bench = load_bench_set(DATA / "mtbench.jsonl")
    assert bench.format == "mtbench" and bench.records == 7 and len(bench.items) == 2
    assert dict(bench.excluded) == {"human_tie": 2, "other_turn": 1, "invalid_record": 2}
    assert {(p["index"], p["field"]) for p in bench.problems} == {("5", "conversation_a"), ("6", "winner")}
    assert bench.items[0].instruction == "Write a travel blog intro about Hawaii."
    assert [i.human for i in bench.items] == ["a", "b"]
    assert accuracy_of(bench, "length:longer") == (0.5, 1, 0)


def test_hf_sets_load_through_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`hf:` goes through datasets.load_dataset; here a local dataset folder (no hub offline)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "rb"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "filtered-00000.jsonl").write_text((DATA / "rewardbench.jsonl").read_text())
    bench = load_bench_set(f"hf:{folder}")
    assert bench.format == "rewardbench" and bench.records == 8 and len(bench.items) == 6
    # datasets decodes the mixed-type column as JSON: the answer "144" arrives as an int
    assert dict(bench.coerced) == {"chosen": 1} and bench.items[3].response_a == "144"
    with pytest.raises(InputError, match="no split 'nope'"):
        load_bench_set(f"hf:{folder}:nope")


def test_unknown_shapes_are_clear_errors_or_counted(tmp_path: Path) -> None:
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(InputError, match="cannot tell the format.*--format"):
        load_bench_set(odd)
    with pytest.raises(ConfigError, match="format 'nope'"):
        load_bench_set(odd, "nope")
    mixed = tmp_path / "mixed.json"
    mixed.write_text(
        json.dumps(
            [3, "text", None, {"instruction": "i", "response_a": "x", "response_b": "yy", "label": "a"}]
        )
    )
    bench = load_bench_set(mixed, "generic")
    assert bench.records == 4 and len(bench.items) == 1 and bench.excluded["invalid_record"] == 3
    assert detect_format([None, {"output_1": 1, "output_2": 2, "label": 1, "input": ""}], "x") == "llmbar"
    with pytest.raises(InputError, match="no such file"):
        load_bench_set(tmp_path / "absent.jsonl")


def test_random_baseline_is_stable_per_item() -> None:
    bench = load_bench_set(DATA / "generic.jsonl")
    judge = baseline_judge("random:7")
    assert judge == BaselineJudge("random:7")
    picks = {i.id: judge.pick(i) for i in bench.items}
    assert picks == {i.id: judge.pick(i) for i in reversed(bench.items)}
    assert set(picks.values()) <= {"a", "b"}
    with pytest.raises(ConfigError):
        baseline_judge("random:x")
    with pytest.raises(ConfigError):
        baseline_judge("length:median")
    assert baseline_judge("policy:m1") is None


# ---------------------------------------------------------------- metrics


def test_sharded_bench_judges_each_item_once_and_merges_in_item_order(tmp_path: Path) -> None:
    """Three shard jobs then the stage's own job (the evaluate stage's judge benchmark in the
    distributed mode): every item judged exactly once, by one shard, the store merged in the
    sample's order, and the report the unsharded run's."""
    import asyncio

    from selfreward.evaluation.judge_bench import bench_judges
    from selfreward.shards import Sharding, shard_path

    bench = load_bench_set(DATA / "generic.jsonl")
    judges = [baseline_judge("random:7"), baseline_judge("length:longer")]
    assert all(j is not None for j in judges)

    def run(out: Path, sharding: Sharding | None) -> dict[str, Any]:
        return asyncio.run(
            bench_judges(
                bench,
                judges,
                mode="pointwise",
                out_dir=out,
                limit=None,
                seed=3,
                bootstrap_samples=50,
                sharding=sharding,
            )
        )

    plain = run(tmp_path / "plain", None)
    sharded = tmp_path / "sharded"
    judged = [run(sharded, Sharding(n=3, i=i))["judges"] for i in range(3)]
    for name in ("random:7", "length:longer"):
        counts = [j[name] for j in judged]
        assert sum(counts) == len(bench.items) and max(counts) - min(counts) <= 1, counts
    store = sharded / "verdicts" / "length_longer-baseline.jsonl"
    assert not store.exists() and shard_path(store, 0, 3).is_file()
    merged = run(sharded, Sharding(n=3))
    assert not shard_path(store, 0, 3).exists()
    ids = [r["id"] for r in load_jsonl(store)]
    assert ids == [r["id"] for r in load_jsonl(tmp_path / "plain" / "verdicts" / store.name)]
    assert len(set(ids)) == len(ids) == len(bench.items)

    def metrics(report: dict[str, Any]) -> list[Any]:  # the report less its timings and costs
        return [(j["judge"], j["metrics"]) for j in report["judges"]]

    assert metrics(merged) == metrics(plain)
    again = run(sharded, Sharding(n=3))  # idempotent: nothing judged twice
    assert [r["id"] for r in load_jsonl(store)] == ids and metrics(again) == metrics(plain)


def test_metrics_against_hand_built_verdicts() -> None:
    v = [
        ItemVerdict("a", "a", 10, 5, "x", "A", "A", True),  # correct, human longer, consistent
        ItemVerdict("a", "b", 3, 8, "x", "B", "B", True),  # wrong, human shorter, consistent
        ItemVerdict("b", "tie", 4, 9, "x", "A", "B", True),  # tie, human longer, first position both times
        ItemVerdict("b", "b", 6, 6, "y", "B", "B", True),  # correct, equal lengths
        ItemVerdict("a", None, 5, 5, "y", None, None, True),  # failure
        ItemVerdict("b", "tie", 7, 2, "y", "B", "A", True),  # tie, human shorter, second position both times
    ]
    m = bench_metrics(v, bootstrap_samples=500, seed=3)
    assert (m["n"], m["failures"], m["correct"], m["judge_ties"]) == (5, 1, 2, 2)
    assert m["accuracy"] == pytest.approx(0.6) and m["accuracy_ties_wrong"] == pytest.approx(0.4)
    assert m["parse_failure_rate"] == pytest.approx(1 / 6)
    lo, hi = m["intervals"]["accuracy"]
    assert 0 <= lo <= 0.6 <= hi <= 1
    assert m == bench_metrics(v, bootstrap_samples=500, seed=3)  # seeded
    assert m["position"] == {
        "both_orders": 5,
        "consistent": 3,
        "consistency": 0.6,
        "inconsistent": 2,
        "first_position_wins": 1,
        "first_position_share": 0.5,
    }
    length = m["length"]
    assert length["accuracy_human_prefers_longer"] == 0.75 and length["n_human_prefers_longer"] == 2
    assert length["accuracy_human_prefers_shorter"] == 0.25 and length["n_human_prefers_shorter"] == 2
    assert length["equal_lengths"] == 1 and length["judge_prefers_longer_rate"] == 1.0
    assert length["judge_picks_unequal"] == 2 and length["human_prefers_longer_rate"] == 0.5
    assert m["subsets"]["x"]["n"] == 3 and m["subsets"]["x"]["accuracy"] == pytest.approx(0.5)
    assert m["subsets"]["y"]["n"] == 2 and m["subsets"]["y"]["failures"] == 1
    assert m["subsets"]["y"]["accuracy"] == pytest.approx(0.75)
    perfect = bench_metrics([ItemVerdict("a", "a", 1, 2)] * 4, bootstrap_samples=200, seed=0)
    assert perfect["intervals"]["accuracy"] == [1.0, 1.0] and perfect["position"] is None


# ---------------------------------------------------------------- the command


def invoke(args: list[str]) -> str:
    result = CliRunner().invoke(app, ["eval", "judge", *args])
    assert result.exit_code == 0, result.output + (repr(result.exception) if result.exception else "")
    return result.output


def by_judge(out: Path) -> dict[str, dict[str, Any]]:
    data = json.loads((out / "report.json").read_text())
    return {j["judge"]: j for j in data["judges"]}


def test_cli_baselines_resume_and_report(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    args = ["--bench", str(DATA / "generic.jsonl"), "--out", str(out), "--seed", "5"]
    output = invoke(args)
    assert "Judge benchmark" in output and "length:longer" in output and "62.5%" in output
    judges = by_judge(out)
    assert set(judges) == {"length:longer", "length:shorter", "random:5"}
    longer = judges["length:longer"]["metrics"]
    assert (longer["n"], longer["correct"], longer["judge_ties"], longer["accuracy"]) == (4, 2, 1, 0.625)
    assert longer["subsets"]["short"]["accuracy"] == 0.5 and longer["subsets"]["long"]["accuracy"] == 0.75
    data = json.loads((out / "report.json").read_text())
    assert data["set"]["excluded"] == {"human_tie": 1, "identical_responses": 1, "invalid_record": 3}
    assert sorted(data["plots"]) == ["accuracy.png", "length_bias.png"]
    for name in ("report.md", "accuracy.png", "length_bias.png"):
        assert (out / name).stat().st_size > 0
    assert "Invalid records (3" in (out / "report.md").read_text()
    assert len(load_jsonl(out / "verdicts" / "length_longer-baseline.jsonl")) == 4
    invoke(args)  # again: everything is in the verdicts files
    again = by_judge(out)["length:longer"]["cost"]
    assert again["already_judged"] == 4 and again["judged_now"] == 0
    # a limit is a seeded sample of the judgeable items
    invoke(["--bench", str(DATA / "generic.jsonl"), "--out", str(tmp_path / "lim"), "--limit", "2"])
    assert json.loads((tmp_path / "lim" / "report.json").read_text())["set"]["sampled"] == 2


def test_cli_bad_judge_spec_is_one_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["eval", "judge", "--bench", str(DATA / "generic.jsonl"), "--out", str(tmp_path), "-j", "random:x"],
    )
    assert (
        result.exit_code != 0
        and "random:<integer seed>" in result.output
        and "Traceback" not in result.output
    )


KEY = "bench-key"


def longer_wins(model: str, prompt: str, body: dict[str, Any]) -> str:
    """A pairwise Gemini judge preferring the longer shown output (the first when equal)."""
    from test_eval_served import outputs_of

    first, second = outputs_of(prompt)
    return "M" if len(second) > len(first) else "m"


@pytest.fixture()
def gemini() -> Iterator[FakeGemini]:
    with fake_gemini(api_key=KEY, reply=longer_wins) as fake:
        yield fake


def test_gemini_pairwise_judge_both_orders(
    tmp_path: Path, gemini: FakeGemini, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fake prefers the longer output in each order, so it agrees with length:longer exactly;
    on equal lengths it names the first shown in both orders: inconsistent, a judge tie."""
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    config = tmp_path / "c.yaml"
    config.write_text(f"teacher:\n  gemini_base_url: {gemini.base_url}\n")
    out = tmp_path / "g"
    args = ["--bench", str(DATA / "generic.jsonl"), "-j", "gemini:gemini-2.5-flash", "--mode", "pairwise"]
    args += ["--out", str(out), "--config", str(config)]
    invoke(args)
    judges = by_judge(out)
    g = judges["gemini:gemini-2.5-flash"]
    assert g["mode"] == "pairwise"
    m, base = g["metrics"], judges["length:longer"]["metrics"]
    assert (m["n"], m["correct"], m["judge_ties"], m["accuracy"]) == (
        base["n"],
        base["correct"],
        base["judge_ties"],
        0.625,
    )
    assert m["position"]["consistency"] == 0.75 and m["position"]["first_position_share"] == 1.0
    assert g["cost"]["verdicts_now"] == 8 and g["cost"]["tokens_now"]["prompt_tokens"] > 0
    calls = len(gemini.requests)
    invoke(args)
    assert len(gemini.requests) == calls  # resumed from the verdicts file: no request


@pytest.mark.timeout(300)
def test_tiny_model_judge_pointwise_on_the_policy_server(tmp_path: Path, policy_server) -> None:
    """The tiny model judging with the tests' short rubric in logprob mode (the builtin rubric does
    not fit its 1024-token context: every item would be a counted context_overflow failure)."""
    from selfreward.testing.tiny_run import SHORT_JUDGE

    (tmp_path / "short.txt").write_text(SHORT_JUDGE)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"judge:\n  template: {tmp_path / 'short.txt'}\n  mode: logprob\n  samples: 1\n  max_tokens: 16\n"
    )
    out = tmp_path / "tiny"
    args = ["--bench", str(DATA / "llmbar"), "-j", "policy:tiny", "--out", str(out), "--config", str(config)]
    invoke([*args, "--policy-url", policy_server.url, "--no-baselines"])
    (tiny,) = by_judge(out).values()
    m = tiny["metrics"]
    assert tiny["mode"] == "pointwise" and m["n"] + m["failures"] == 4  # every item judged or failed
    assert set(m["subsets"]) == {"Adversarial/Neighbor", "Natural"}
    records = load_jsonl(out / "verdicts" / "policy_tiny-pointwise.jsonl")
    assert len(records) == 4 and all(len(r["scores"]) == 2 for r in records)
    assert all((r["pick"] is None) == (r["failure"] is not None) for r in records)
    assert tiny["cost"]["verdicts_now"] == 8 and tiny["cost"]["tokens_now"]["prompt_tokens"] > 0
    # a rerun judges nothing again: the verdicts file is the resume state
    invoke([*args, "--policy-url", policy_server.url, "--no-baselines"])
    (again,) = by_judge(out).values()
    assert again["cost"]["judged_now"] == 0 and again["metrics"] == m


def test_real_oasst_ranks_as_a_generic_set(tmp_path: Path, shared_data: Path) -> None:
    """../shared/data's OASST trees: each prompt's best-ranked reply against its second (a human
    preference), written in the generic format with the better reply on alternating sides; the
    baselines judge every item and the accounting holds on real text."""
    from selfreward.data.oasst import build_forest, read_source

    source = read_source(str(shared_data / "oasst1" / "en_100_tree.jsonl"))
    forest = build_forest(source.messages)
    rows = []

    def walk(node: Any) -> None:
        ranked = sorted(
            (c for c in node.children if c.role == "assistant" and c.rank is not None), key=lambda c: c.rank
        )
        if node.role == "prompter" and len(ranked) >= 2 and ranked[0].rank < ranked[1].rank:
            best, second = ranked[0].text, ranked[1].text
            flip = len(rows) % 2 == 1
            rows.append(
                {
                    "id": node.id,
                    "instruction": node.text,
                    "response_a": second if flip else best,
                    "response_b": best if flip else second,
                    "label": "b" if flip else "a",
                }
            )
        for child in node.children:
            walk(child)

    for root in forest.roots:
        walk(root)
    assert len(rows) > 100
    path = tmp_path / "oasst-pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "oasst"
    invoke(["--bench", str(path), "--out", str(out)])
    data = json.loads((out / "report.json").read_text())
    assert data["set"]["records"] == len(rows)
    assert data["set"]["items"] + sum(data["set"]["excluded"].values()) == len(rows)
    judges = {j["judge"]: j["metrics"] for j in data["judges"]}
    longer, shorter = judges["length:longer"], judges["length:shorter"]
    assert longer["n"] == data["set"]["items"] and longer["failures"] == 0
    # the two length baselines are mirror images: their accuracies sum to exactly 1
    assert longer["accuracy"] + shorter["accuracy"] == pytest.approx(1.0)
    print(f"OASST ranks: {longer['n']} items, length:longer accuracy {longer['accuracy']:.3f}")


def test_trends_show_the_bench_accuracy_per_iteration() -> None:
    """The run's trends: the self-judge's benchmark accuracy by model next to the length baseline."""
    from selfreward.reports.trends import trend_series

    def report(model: str, self_acc: float) -> dict[str, Any]:
        judges = [
            {"role": "self", "metrics": {"accuracy": self_acc}},
            {"role": "length:longer", "metrics": {"accuracy": 0.6}},
            {"role": "random:7", "metrics": {"accuracy": 0.5}},
        ]
        return {"model": model, "judge_bench": {"llmbar": {"judges": judges}}}

    labels, series = trend_series([report("m2", 0.7), {"model": "m3"}, report("m4", 0.4)])
    assert labels == ["m2", "m3", "m4"]
    assert series["judge bench llmbar: self"] == [0.7, None, 0.4]
    assert series["judge bench llmbar: length:longer"] == [0.6, None, 0.6]
    assert not any("random" in name for name in series)
