"""Head-to-head evaluation: both models answer the same prompts, a judge compares each pair in
both orders (`Judge.compare`), and win/tie/loss with bootstrap intervals is reported."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfreward.evaluation.answers import AnswerSide, GenerationSettings, collect_answers, safe_name
from selfreward.evaluation.metrics.winrate import head_to_head
from selfreward.evaluation.pairwise import PairItem, judge_pairs
from selfreward.evaluation.prompt_sets import EvalPrompt
from selfreward.judging.protocol import Judge
from selfreward.llm.openai import OpenAICompatClient
from selfreward.progress import NULL_PROGRESS, Progress
from selfreward.reports.files import write_report
from selfreward.reports.markdown import head2head_markdown
from selfreward.reports.plots import win_tie_loss_bars
from selfreward.shards import Sharding, pick


async def run_head2head(
    a: AnswerSide,
    b: AnswerSide,
    prompts: Sequence[EvalPrompt],
    *,
    judge: Judge,
    judge_name: str,
    client: OpenAICompatClient | None,
    work_dir: Path,
    answers_dir: Path | None = None,
    settings: GenerationSettings = GenerationSettings(),
    bootstrap_samples: int = 1000,
    seed: int = 0,
    prompts_spec: str | None = None,
    progress: Progress = NULL_PROGRESS,
    sharding: Sharding | None = None,
    answer_concurrency: int | None = None,
) -> dict[str, Any]:
    """Head-to-head data (report.json content): A's win/tie/loss against B, answer lengths, settings.

    Both sides' answers are generated at once, `answer_concurrency` requests in flight for the
    two together (default: the client's own limit): decoding on a CPU reads every weight once
    per step whatever the batch, so one batch of both models' answers is faster than two
    (`eval.concurrency`, docs/evaluation.md). Generated answers are kept in `answers_dir`
    (default `work_dir`), verdicts in `work_dir/verdicts-<a>-vs-<b>.jsonl`; both are resumable.
    A shard job (`sharding.is_shard`) answers and judges its part of the prompts into shard files
    (`selfreward.shards`) and returns only its counts; the stage's own job merges them and
    computes the data.
    """
    answers_dir = answers_dir or work_dir
    if sharding is not None and sharding.is_shard:
        prompts = pick(prompts, sharding, lambda p: p.id)
        if not prompts:
            return {"kind": "head2head-shard", "prompt_count": 0, "judged": 0}
    generator = client
    if client is not None and answer_concurrency is not None:
        generator = client.view(concurrency=answer_concurrency)
    try:
        answers_a, answers_b = await asyncio.gather(
            *(
                collect_answers(
                    side,
                    prompts,
                    client=generator,
                    store_dir=answers_dir,
                    settings=settings,
                    progress=progress,
                    sharding=sharding,
                )
                for side in (a, b)
            )
        )
    finally:
        if generator is not client and generator is not None:
            await generator.aclose()
    items = [PairItem(p.id, p.instruction, answers_a[p.id], answers_b[p.id]) for p in prompts]
    verdicts = await judge_pairs(
        judge,
        items,
        judge_name=judge_name,
        store_path=work_dir / f"verdicts-{safe_name(a.name)}-vs-{safe_name(b.name)}.jsonl",
        progress=progress,
        task_name=f"judging {a.name} vs {b.name}",
        sharding=sharding,
    )
    if sharding is not None and sharding.is_shard:
        return {"kind": "head2head-shard", "prompt_count": len(items), "judged": len(verdicts)}
    result = head_to_head(
        [v["preference"] for v in verdicts],
        a=a.name,
        b=b.name,
        bootstrap_samples=bootstrap_samples,
        seed=seed,
    )
    n = len(items)
    return {
        "kind": "head2head",
        **result.to_json(),
        "judge": judge_name,
        "prompts": prompts_spec,
        "prompt_count": n,
        "identical_answers": sum(1 for it in items if it.identical),
        "mean_answer_chars": {
            a.name: sum(len(it.output_a) for it in items) / n,
            b.name: sum(len(it.output_b) for it in items) / n,
        },
        "sources": {a.name: str(a.file or "generated"), b.name: str(b.file or "generated")},
        "generation": {
            "max_tokens": settings.max_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "seed": settings.seed,
        },
    }


def head2head_report(out_dir: Path, data: dict[str, Any]) -> dict[str, Path]:
    """Write report.json, report.md and win_tie_loss.png for one head-to-head."""
    md = "# Head-to-head evaluation\n\n" + head2head_markdown(data) + "\n![win/tie/loss](win_tie_loss.png)\n"
    return write_report(out_dir, data, md, {"win_tie_loss.png": win_tie_loss_bars([data])})
