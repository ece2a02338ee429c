"""Evaluation prompt sets: ift-eval, AlpacaEval, MT-bench (first turn), any jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfreward.errors import ConfigError, InputError
from selfreward.evaluation.prompt_sets import load_prompt_set, seeded_subset


def test_ift_eval_reads_the_runs_eft_eval_prompts(tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "eft_eval.jsonl").write_text(
        "".join(
            json.dumps({"id": f"e{i}", "tree_id": "t", "prompt": f"question {i}", "replies": []}) + "\n"
            for i in range(5)
        )
    )
    prompts = load_prompt_set("ift-eval", seed_dir=seed)
    assert [p.id for p in prompts] == ["e0", "e1", "e2", "e3", "e4"] and prompts[
        2
    ].instruction == "question 2"
    subset = load_prompt_set("ift-eval", seed_dir=seed, max_prompts=3, seed=1)
    assert len(subset) == 3 and subset == load_prompt_set("ift-eval", seed_dir=seed, max_prompts=3, seed=1)
    assert [p.id for p in subset] == sorted(p.id for p in subset)  # file order kept
    with pytest.raises(ConfigError, match="needs a run"):
        load_prompt_set("ift-eval")
    with pytest.raises(InputError, match="eft_eval.jsonl: not found"):
        load_prompt_set("ift-eval", seed_dir=tmp_path)


def test_generic_jsonl_and_json(tmp_path: Path) -> None:
    f = tmp_path / "mine.jsonl"
    f.write_text('{"instruction": "a"}\n{"prompt": "b", "id": 7}\n')
    assert [(p.id, p.instruction, p.dataset) for p in load_prompt_set(str(f))] == [
        ("line-0", "a", "mine"),
        ("7", "b", "mine"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"}\n{"text": "b"}\n')
    with pytest.raises(
        InputError, match=r"bad\.jsonl:2: needs a non-empty string field 'instruction' or 'prompt'"
    ):
        load_prompt_set(str(bad))
    with pytest.raises(ConfigError, match="expected ift-eval"):
        load_prompt_set(str(tmp_path / "missing.jsonl"))


def test_seeded_subset_is_stable() -> None:
    assert seeded_subset(list(range(10)), None, 0) == list(range(10))
    assert seeded_subset(list(range(10)), 4, 3) == seeded_subset(list(range(10)), 4, 3)
    assert len(seeded_subset(list(range(10)), 4, 3)) == 4


@pytest.mark.shared_data
def test_real_alpaca_eval_and_mt_bench(shared_data: Path) -> None:
    alpaca = load_prompt_set(f"alpaca_eval:{shared_data / 'alpaca_eval' / 'gpt4_1106_preview.json'}")
    assert len(alpaca) == 805 and alpaca[0].id == "alpaca-0" and alpaca[0].dataset == "helpful_base"
    mt = load_prompt_set(f"mt_bench:{shared_data / 'mt_bench' / 'question.jsonl'}")
    assert (
        len(mt) == 80 and mt[0].id == "mt-81" and mt[0].instruction.startswith("Compose an engaging travel")
    )
    assert mt[0].dataset == "mt_bench:writing"
