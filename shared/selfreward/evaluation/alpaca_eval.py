"""AlpacaEval-style evaluation: export a model's outputs in AlpacaEval's format and, with a
judge, its win rate against reference outputs (identical outputs count half) and our
length-controlled win rate (selfreward.evaluation.metrics.alpaca)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from selfreward.errors import EmptyResultError, InputError
from selfreward.evaluation.answers import AnswerSide, GenerationSettings, collect_answers, safe_name
from selfreward.evaluation.metrics.alpaca import (
    AlpacaOutput,
    align_outputs,
    alpaca_win_rate,
    length_controlled_win_rate,
    read_outputs,
    write_outputs,
)
from selfreward.evaluation.metrics.winrate import head_to_head
from selfreward.evaluation.pairwise import PairItem, judge_pairs
from selfreward.evaluation.prompt_sets import EvalPrompt, seeded_subset
from selfreward.judging.protocol import Judge
from selfreward.llm.openai import OpenAICompatClient
from selfreward.progress import NULL_PROGRESS, Progress
from selfreward.reports.files import write_report
from selfreward.reports.markdown import alpaca_markdown
from selfreward.reports.plots import win_tie_loss_bars


async def model_outputs(
    side: AnswerSide,
    prompts: Sequence[EvalPrompt],
    *,
    client: OpenAICompatClient | None,
    work_dir: Path,
    settings: GenerationSettings,
    progress: Progress = NULL_PROGRESS,
) -> list[AlpacaOutput]:
    """The model's outputs on `prompts` in AlpacaEval's format.

    A file side keeps only the prompts it answers (AlpacaEval aligns by instruction);
    a served model answers every prompt.
    """
    if side.file is not None:
        wanted = {p.instruction: p for p in prompts}
        return [
            AlpacaOutput(o.instruction, o.output, side.name, wanted[o.instruction].dataset)
            for o in read_outputs(side.file, side.name)
            if o.instruction in wanted
        ]
    answers = await collect_answers(
        side, prompts, client=client, store_dir=work_dir, settings=settings, progress=progress
    )
    return [AlpacaOutput(p.instruction, answers[p.id], side.name, p.dataset) for p in prompts]


def _difficulties(difficulty: dict[str, float], instructions: Sequence[str]) -> list[float]:
    missing = [i for i in instructions if i not in difficulty]
    if missing:
        raise InputError(
            f"the instruction difficulties lack {len(missing)} of the {len(instructions)} judged instructions "
            f"(first: {missing[0][:80]!r})"
        )
    return [difficulty[i] for i in instructions]


def reference_prompts(
    reference: Sequence[AlpacaOutput], max_prompts: int | None, seed: int
) -> list[EvalPrompt]:
    """The reference's instructions as a prompt set (seeded subset when max_prompts is smaller)."""
    prompts = [EvalPrompt(f"alpaca-{i}", r.instruction, r.dataset) for i, r in enumerate(reference)]
    return seeded_subset(prompts, max_prompts, seed)


async def run_alpaca(
    side: AnswerSide,
    prompts: Sequence[EvalPrompt],
    *,
    work_dir: Path,
    client: OpenAICompatClient | None,
    settings: GenerationSettings = GenerationSettings(),
    reference_path: Path | None = None,
    judge: Judge | None = None,
    judge_name: str | None = None,
    difficulty: dict[str, float] | None = None,
    bootstrap_samples: int = 1000,
    seed: int = 0,
    progress: Progress = NULL_PROGRESS,
) -> dict[str, Any]:
    """Write `work_dir/model_outputs.json`; with a reference and a judge, compute the win rates."""
    outputs = await model_outputs(
        side, prompts, client=client, work_dir=work_dir, settings=settings, progress=progress
    )
    if not outputs:
        raise EmptyResultError(f"{side.file or side.name}: no output for any of the {len(prompts)} prompts")
    exported = write_outputs(work_dir / "model_outputs.json", outputs)
    data: dict[str, Any] = {
        "kind": "alpaca",
        "generator": side.name,
        "instructions": len(outputs),
        "model_outputs": str(exported),
        "settings": None if side.file else asdict(settings),
    }
    if reference_path is None or judge is None:
        return data
    reference = read_outputs(reference_path)
    wanted = {p.instruction for p in prompts}
    aligned = align_outputs(outputs, [r for r in reference if r.instruction in wanted])
    if not aligned.pairs:
        raise EmptyResultError(f"{reference_path}: no instruction in common with the model outputs")
    prompt_ids = {p.instruction: p.id for p in prompts}
    items = [PairItem(prompt_ids[m.instruction], m.instruction, m.output, r.output) for m, r in aligned.pairs]
    name = judge_name or "judge"
    verdicts = await judge_pairs(
        judge,
        items,
        judge_name=name,
        store_path=work_dir / f"verdicts-{safe_name(side.name)}-vs-reference.jsonl",
        progress=progress,
        task_name=f"judging {side.name} vs reference",
    )
    prefs = [v["preference"] for v in verdicts]
    wr = alpaca_win_rate(prefs, [bool(v["identical"]) for v in verdicts])
    wtl = head_to_head(
        prefs,
        a=side.name,
        b=aligned.pairs[0][1].generator,
        bootstrap_samples=bootstrap_samples,
        seed=seed,
    )
    judged = [(it, p) for it, p in zip(items, prefs, strict=True) if p is not None]
    lc = None
    if len(judged) >= 2:
        lc = length_controlled_win_rate(
            [p for _, p in judged],
            [len(it.output_a) for it, _ in judged],
            [len(it.output_b) for it, _ in judged],
            difficulty=_difficulties(difficulty, [it.instruction for it, _ in judged])
            if difficulty
            else None,
        ).to_json()
    data.update(
        reference=str(reference_path),
        reference_generator=aligned.pairs[0][1].generator,
        judge=name,
        win_rate=wr.to_json(),
        win_tie_loss=wtl.to_json(),
        length_controlled=lc,
        only_in_model=len(aligned.only_in_model),
        only_in_reference=len(aligned.only_in_reference),
    )
    return data


def alpaca_report(out_dir: Path, data: dict[str, Any]) -> dict[str, Path]:
    """Write report.json, report.md (and win_tie_loss.png when judged)."""
    plots: dict[str, bytes] = {}
    md = "# AlpacaEval-style evaluation\n\n" + alpaca_markdown(data)
    if data.get("win_tie_loss"):
        plots["win_tie_loss.png"] = win_tie_loss_bars([data["win_tie_loss"]], "AlpacaEval-style")
        md += "\n![win/tie/loss](win_tie_loss.png)\n"
    return write_report(out_dir, data, md, plots)
