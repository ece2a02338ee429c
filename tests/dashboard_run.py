"""Run folders for the dashboard's tests, written with the project's own writers and record
schemas (manifests, JSONL files, the trainer's log history, the evaluation's report with the real
head-to-head metric): a finished self-reward run of two iterations, and one stage still running."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from selfreward.config import RunConfig, dump_config
from selfreward.evaluation.metrics.reward_model import compare_with_human, parse_scored_record
from selfreward.evaluation.metrics.winrate import evidence, head_to_head
from selfreward.reports.files import write_report
from selfreward.schemas import CandidateRecord, EFTEvalRecord, JudgmentRecord, PairRecord, PromptRecord
from selfreward.stages import plan
from selfreward.storage import RunLayout, atomic_write_json, write_jsonl_atomic, write_manifest
from selfreward.training.runner import LOG_HISTORY, write_log_history

PROMPTS = [
    "Explain how photosynthesis works in simple terms.",
    "Write a short poem about the sea at night.",
    "Give three tips for learning a new language.",
    "What is the difference between weather and climate?",
]


def write_config(root: Path, name: str, iterations: int = 2) -> RunLayout:
    layout = RunLayout(root, name)
    config = RunConfig.model_validate(
        {
            "name": name,
            "artifact_root": str(root),
            "iterations": iterations,
            "model": {"base": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            "candidates": {"n": 3},
        }
    )
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    layout.config_path.write_text(dump_config(config))
    return layout


def stage_done(layout: RunLayout, t: int, stage: str, seconds: float, **fields: Any) -> None:
    write_manifest(
        layout.stage_manifest(t, stage),
        {
            "stage": stage,
            "iteration": t,
            "run": layout.run,
            "started_at": time.time() - seconds,
            "seconds": seconds,
            **fields,
        },
    )


def write_iteration_data(layout: RunLayout, t: int, tie_prompt: int | None = 3) -> list[dict[str, Any]]:
    """prompts, 3 candidates each, one verdict each, and pairs (best vs worst; a tie dropped)."""
    model = plan.model_name(t)
    prompts, candidates, judgments, pairs = [], [], [], []
    for i, text in enumerate(PROMPTS):
        pid = f"it{t}-p{i}"
        prompts.append(PromptRecord(id=pid, prompt=text, source="file").model_dump(mode="json"))
        scores = [2.0, 2.0, 2.0] if i == tie_prompt else [1.0 + i % 2, 4.0 + t / 2, 3.0]
        answers = []
        for k, score in enumerate(scores):
            answer = f"Answer {k} of {model} to prompt {i}: " + ("sunlight feeds the plant. " * (k + 1))
            answers.append(answer)
            cid = f"{pid}:{k}"
            candidates.append(
                CandidateRecord(
                    id=cid, prompt_id=pid, prompt=text, index=k, text=answer, model=model
                ).model_dump(mode="json")
            )
            failure = "unparseable" if (i == 1 and k == 0) else None
            judgments.append(
                JudgmentRecord(
                    id=cid,
                    prompt_id=pid,
                    index=k,
                    judge=f"policy:{model}-abc",
                    template_sha256="0" * 64,
                    mode="sample",
                    verdicts=[
                        {
                            "text": f"The answer is clear. Score: {int(score)}"
                            if failure is None
                            else "I think.",
                            "score": None if failure else score,
                            "failure": failure,
                        }
                    ],
                    score=None if failure else score,
                    failures=1 if failure else 0,
                ).model_dump(mode="json")
            )
        if i == tie_prompt:
            continue
        best = max(range(3), key=lambda k: scores[k])
        worst = min(range(3), key=lambda k: scores[k])
        pairs.append(
            PairRecord(
                prompt_id=pid,
                prompt=[{"role": "user", "content": text}],
                chosen=[{"role": "assistant", "content": answers[best]}],
                rejected=[{"role": "assistant", "content": answers[worst]}],
                chosen_score=scores[best],
                rejected_score=scores[worst],
                chosen_id=f"{pid}:{best}",
                rejected_id=f"{pid}:{worst}",
            ).model_dump(mode="json", exclude_none=True)
        )
    write_jsonl_atomic(layout.stage_file(t, "prompts"), prompts)
    write_jsonl_atomic(layout.stage_file(t, "candidates"), candidates)
    write_jsonl_atomic(layout.stage_file(t, "judgments"), judgments)
    write_jsonl_atomic(layout.stage_file(t, "pairs"), pairs)
    return pairs


def write_model(layout: RunLayout, name: str, kind: str, steps: int, t: int) -> None:
    history = []
    for step in range(1, steps + 1):
        row: dict[str, Any] = {
            "step": step,
            "loss": round(1.0 / (step + t), 4),
            "learning_rate": 1e-5,
            "epoch": step / steps,
        }
        if kind == "dpo":
            row.update({"rewards/margins": 0.1 * step, "rewards/accuracies": min(1.0, 0.5 + 0.1 * step)})
        history.append(row)
    history.append({"train_runtime": 3.2, "train_loss": 0.5, "step": steps})  # the summary entry: skipped
    write_log_history(layout.model_dir(name) / LOG_HISTORY, history)
    atomic_write_json(
        layout.model_manifest(name),
        {"name": name, "kind": kind, "adapter_sha256": "ab" * 32, "files": [LOG_HISTORY]},
    )


def reward_model(t: int) -> dict[str, Any]:
    """The judge against human ranks (the real metric): 4 prompts, the best reply scored higher
    in t + 1 of them."""
    eft = [
        EFTEvalRecord(
            id=f"h{i}",
            tree_id=f"tree{i}",
            prompt=f"human-ranked question {i}",
            replies=[
                {"message_id": f"h{i}a", "text": "good", "rank": 0},
                {"message_id": f"h{i}b", "text": "bad", "rank": 1},
            ],
        )
        for i in range(4)
    ]
    scores = {
        f"h{i}": parse_scored_record(
            {"prompt_id": f"h{i}", "completion": {"0": {"score": 4 if i <= t else 1}, "1": {"score": 2}}}, "s"
        )
        for i in range(4)
    }
    return compare_with_human(scores, eft).to_json()


def write_eval(layout: RunLayout, t: int, prefs: list[float]) -> None:
    model, baseline = plan.model_name(t + 1), plan.model_name(t)
    h2h = {"kind": "head2head", **head_to_head(prefs, a=model, b=baseline, bootstrap_samples=200).to_json()}
    h2h.update(judge="gemini:fake", prompts="ift-eval", mean_answer_chars={model: 120.0 + t, baseline: 100.0})
    h2h["summary"] = evidence(h2h, min_n=4)
    eval_dir = layout.eval_dir / f"iter-{t}"
    answers_dir = layout.eval_dir / "answers"
    verdicts = []
    for side in (model, baseline):
        write_jsonl_atomic(
            answers_dir / f"answers-{side}.jsonl",
            [
                {
                    "key": f"e{i}|{side}",
                    "prompt_id": f"e{i}",
                    "instruction": f"Eval question {i}?",
                    "model": side,
                    "output": f"{side} says answer {i}",
                    "finish_reason": "stop",
                }
                for i in range(len(prefs))
            ],
        )
    for i, p in enumerate(prefs):
        winner = "A" if p > 0.5 else "B"
        verdicts.append(
            {
                "key": f"e{i}|x|gemini:fake",
                "prompt_id": f"e{i}",
                "judge": "gemini:fake",
                "identical": False,
                "preference": p,
                "failure": None,
                "ab": {
                    "order": "ab",
                    "text": f"Output ({1 if winner == 'A' else 2}) is better",
                    "winner": winner,
                },
                "ba": {
                    "order": "ba",
                    "text": f"Output ({2 if winner == 'A' else 1}) is better",
                    "winner": winner,
                },
            }
        )
    write_jsonl_atomic(eval_dir / f"verdicts-{model}-vs-{baseline}.jsonl", verdicts)
    data = {
        "kind": "iteration",
        "run": layout.run,
        "iteration": t,
        "model": model,
        "baseline": baseline,
        "judge": "gemini:fake",
        "head2head": h2h,
        "reward_model": {"judge": model, **reward_model(t)},
        "judge_health": {
            "score_shares": {"0": 0, "1": 0.1, "2": 0.2, "3": 0.3, "4": 0.3, "5": 0.1},
            "top_share": 0.3,
            "collapsed": False,
            "parse_failure_rate": 0.05,
            "chosen_length": 80.0 + t,
            "rejected_length": 60.0,
        },
    }
    write_report(eval_dir, data, f"# iteration {t}\n", {})


def finished_run(root: Path, name: str = "demo") -> RunLayout:
    """Set-up and two iterations done: every stage's manifest, data, models m1..m3, evaluations."""
    layout = write_config(root, name, iterations=2)
    for s in ("prepare", "sft", "publish"):
        stage_done(layout, 0, s, 3.0)
    write_model(layout, "m1", "sft", 5, 0)
    for t in (1, 2):
        pairs = write_iteration_data(layout, t)
        write_model(layout, f"m{t + 1}", "dpo", 4, t)
        write_eval(layout, t, [1.0, 1.0, 0.5, 1.0, 0.0, 1.0, 1.0, 1.0] if t == 1 else [1.0] * 8)
        for s in plan.stages_of(t, "self-reward"):
            fields: dict[str, Any] = {}
            if s.name == "pairs":
                fields = {"pairs": len(pairs), "dropped": {"ties": 1}, "tie_rate": 0.25}
            stage_done(layout, t, s.name, 2.0 + len(s.name), **fields)
    return layout


def write_progress(layout: RunLayout, t: int, stage: str, done: int, total: int) -> None:
    """What the embedded driver's progress sink writes while a stage runs (this process's pid)."""
    now = time.time()
    event = {
        "task": f"{stage} (test)",
        "done": done,
        "total": total,
        "elapsed_s": 4.0,
        "eta_s": 4.0 * (total - done) / max(done, 1),
        "finished": False,
    }
    atomic_write_json(
        layout.stage_progress(t, stage),
        {
            "stage": stage,
            "t": t,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": now - 4,
            "updated_at": now,
            "current": event,
            "tasks": {event["task"]: event},
        },
    )


def running_run(root: Path, name: str = "live") -> RunLayout:
    """Set-up done, iteration 1 at its candidates stage (a progress file of this process)."""
    layout = write_config(root, name, iterations=1)
    for s in ("prepare", "sft", "publish"):
        stage_done(layout, 0, s, 3.0)
    write_model(layout, "m1", "sft", 5, 0)
    write_iteration_data(layout, 1)
    (layout.stage_file(1, "pairs")).unlink()
    stage_done(layout, 1, "prompts", 5.0, count=4)
    write_progress(layout, 1, "candidates", 3, 12)
    return layout


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
