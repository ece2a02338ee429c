"""Evaluation users can trust: the run's evaluator (chosen, pinned, never the model under test
unless asked), held-out prompts (the contamination check), and the summary rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfreward.config import RunConfig
from selfreward.errors import ConfigError, StageError
from selfreward.evaluation.contamination import check_contamination, training_prompts
from selfreward.evaluation.evaluator import SELF_NOTE, evaluator_spec, resolve_evaluator
from selfreward.evaluation.metrics.winrate import evidence, head_to_head
from selfreward.evaluation.prompt_sets import EvalPrompt
from selfreward.storage import RunLayout


def config(tmp_path: Path, **over) -> RunConfig:
    return RunConfig(name="r", artifact_root=tmp_path, **over)


SERVED = {0: "base", 1: "m1-aaaa", 2: "m2-bbbb", 3: "m3-cccc"}


async def served(k: int) -> str:
    return SERVED[k]


def resolve(cfg: RunConfig, t: int, base_dir: Path | None = None):
    import asyncio

    layout = RunLayout(cfg.artifact_root, cfg.name)
    return asyncio.run(resolve_evaluator(cfg, layout, t, served, str(base_dir) if base_dir else None))


def test_the_evaluator_is_the_teacher_else_the_base_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert evaluator_spec(config(tmp_path)) == ("policy:m0", "base")
    assert evaluator_spec(config(tmp_path, teacher={"backend": "gemini:g"})) == ("gemini:g", "teacher")
    assert evaluator_spec(
        config(tmp_path, eval={"judge": "openai:http://x/v1#m"}, teacher={"backend": "gemini:g"})
    ) == (
        "openai:http://x/v1#m",
        "configured",
    )
    ev = resolve(config(tmp_path / "a"), 1, tiny_model_dir)
    assert (ev.kind, ev.judge, ev.model, ev.self_evaluation) == ("base", "policy:base", "m0", False)
    assert ev.weights_sha256 and len(ev.weights_sha256) == 64 and ev.note is None
    pinned = json.loads((tmp_path / "a" / "runs" / "r" / "eval" / "evaluator.json").read_text())
    assert pinned["spec"] == "policy:m0" and pinned["pinned_at_iteration"] == 1
    # a later iteration reads the same pinned evaluator
    again = resolve(config(tmp_path / "a"), 2, tiny_model_dir)
    assert again.judge == "policy:base" and again.pinned_at_iteration == 1
    teacher = resolve(config(tmp_path / "b", teacher={"backend": "gemini:g"}), 1)
    assert (teacher.kind, teacher.judge, teacher.weights_sha256) == ("teacher", "gemini:g", None)


def test_self_evaluation_only_when_asked_and_flagged(tmp_path: Path) -> None:
    ev = resolve(config(tmp_path, eval={"judge": "policy:self"}), 1)
    assert ev.self_evaluation and ev.kind == "self" and ev.judge is None and ev.note == SELF_NOTE
    assert "biased toward the evaluated model" in SELF_NOTE


def test_the_model_under_test_cannot_be_the_evaluator(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the model under test"):
        resolve(config(tmp_path / "a", eval={"judge": "policy:m2"}), 1)  # M2 is evaluated after iteration 1
    with pytest.raises(ConfigError, match="not trained yet"):
        resolve(config(tmp_path / "b", eval={"judge": "policy:m3"}), 1)
    ev = resolve(config(tmp_path / "c", eval={"judge": "policy:m1"}), 2)  # M1 judging M3's iteration
    assert ev.judge == "policy:m1-aaaa" and ev.model == "m1" and ev.kind == "configured"


def test_a_changed_evaluator_is_refused(tmp_path: Path) -> None:
    resolve(config(tmp_path), 1)
    with pytest.raises(StageError, match="pinned to 'policy:m0'.*another ruler"):
        resolve(config(tmp_path, teacher={"backend": "gemini:g"}), 2)


def prompts(*texts: str) -> list[EvalPrompt]:
    return [EvalPrompt(f"e{i}", t, "test") for i, t in enumerate(texts)]


def test_contamination_exact_and_near_duplicates_are_removed_and_counted() -> None:
    training = {
        "seed/ift.jsonl": ["Write a poem about the sea.", "List three uses of baking soda in the kitchen."],
        "iter-1/prompts.jsonl": ["Explain how photosynthesis works in green plants step by step."],
    }
    evals = prompts(
        "write a POEM about the sea!",  # exact after normalisation
        "Explain how photosynthesis works in plants step by step.",  # near: ROUGE-L 0.94
        "What is the capital of Peru?",  # held out
    )
    kept, report = check_contamination(evals, training, threshold=0.7)
    assert [p.id for p in kept] == ["e2"]
    data = report.to_json()
    assert (data["checked"], data["exact_duplicates"], data["near_duplicates"], data["removed"]) == (
        3,
        1,
        1,
        2,
    )
    assert data["training_prompts"] == {"seed/ift.jsonl": 2, "iter-1/prompts.jsonl": 1}
    assert data["examples"][0] == {"id": "e0", "source": "seed/ift.jsonl"}
    assert data["examples"][1]["source"] == "iter-1/prompts.jsonl" and data["examples"][1]["rouge_l"] >= 0.7
    kept, report = check_contamination(evals, training, threshold=0.7, action="report")
    assert len(kept) == 3 and report.to_json()["removed"] == 0 and report.to_json()["near_duplicates"] == 1
    kept, report = check_contamination(evals, training, threshold=0.99)  # near needs >= 0.99 now
    assert [p.id for p in kept] == ["e1", "e2"]


def test_training_prompts_are_the_seed_and_every_iteration_so_far(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path, "r")
    layout.seed_dir.mkdir(parents=True)
    (layout.seed_dir / "ift.jsonl").write_text(json.dumps({"prompt": "seed prompt"}) + "\n")
    for k in (1, 2):
        layout.iter_dir(k).mkdir(parents=True)
        layout.stage_file(k, "prompts").write_text(
            json.dumps({"id": f"t{k}", "prompt": f"iteration {k}"}) + "\n"
        )
    assert training_prompts(layout, 1) == {
        "seed/ift.jsonl": ["seed prompt"],
        "iter-1/prompts.jsonl": ["iteration 1"],
    }
    assert set(training_prompts(layout, 2)) == {
        "seed/ift.jsonl",
        "iter-1/prompts.jsonl",
        "iter-2/prompts.jsonl",
    }


def h2h(prefs: list[float]) -> dict:
    return head_to_head(prefs, a="m2", b="m1", bootstrap_samples=500, seed=0).to_json()


def test_the_summary_rule() -> None:
    small = evidence(h2h([1.0] * 5), min_n=20)
    assert not small["evidence"] and small["text"].startswith(
        "no evidence of a difference between m2 and m1: only 5"
    )
    even = evidence(h2h([1.0, 0.0] * 15), min_n=20)
    assert not even["evidence"] and "interval contains 50%" in even["text"] and "n=30" in even["text"]
    wins = evidence(h2h([1.0] * 27 + [0.0] * 3), min_n=20)
    assert wins["evidence"] and wins["text"].startswith("m2 beats m1: win rate 90.0%")
    losses = evidence(h2h([0.0] * 27 + [0.5] * 3), min_n=20)
    assert losses["evidence"] and losses["text"].startswith("m2 loses to m1")


def test_the_shipped_everyday_prompts_are_held_out_from_the_demo_seed() -> None:
    """The quickstart evaluates on builtin:everyday: none of it duplicates a demo prompt."""
    from selfreward.data.oasst import demo_path
    from selfreward.evaluation.prompt_sets import load_prompt_set

    everyday = load_prompt_set("builtin:everyday")
    assert len(everyday) == 48 and len({p.dataset for p in everyday}) == 6
    demo = [json.loads(line)["prompt"]["text"] for line in demo_path().read_text().splitlines()]
    kept, report = check_contamination(everyday, {"demo": demo}, threshold=0.7)
    assert len(kept) == 48 and report.to_json()["removed"] == 0
