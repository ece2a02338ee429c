"""`selfreward judge ...`: score candidates and compare answer pairs with any judge backend."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from selfreward.cli.ui import RichProgressSink, console, friendly_errors, print_table

app = typer.Typer(
    help="LLM-as-a-Judge: score answers or compare pairs (docs/judge.md).", no_args_is_help=True
)

JUDGE_HELP = "policy:<served-name> | policy:self | gemini:<model> | openai:<base_url>#<model>"


def _setup(
    config_path: Path | None,
    judge: str | None,
    samples: int | None,
    mode: str | None,
    structured: bool | None,
) -> tuple[Any, str]:
    """The run config (file < SELFREWARD_* environment < command-line options) and the judge spec."""
    from selfreward.config import command_config
    from selfreward.errors import ConfigError

    config = command_config(config_path, judge={"samples": samples, "mode": mode, "structured": structured})
    if judge is None:
        spec = config.feedback_judge()
        if spec is None or spec == "policy:self":
            raise ConfigError(["--judge is required (or a --config whose variant names a teacher)"], "judge")
        judge = spec
    return config, judge


@app.command("score")
@friendly_errors
def score(
    file: Path = typer.Argument(
        ..., help="candidates.jsonl, or rows {instruction|prompt, response|text, id?}"
    ),
    judge: str | None = typer.Option(None, "--judge", "-j", help=JUDGE_HELP),
    out: Path = typer.Option(Path("judgments.jsonl"), "--out", "-o", help="judgments (resumable)"),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="run config YAML (judge/teacher sections)"
    ),
    samples: int | None = typer.Option(None, "--samples", "-k", min=1, help="verdicts per response (K)"),
    mode: str | None = typer.Option(None, "--mode", help="sample | logprob"),
    structured: bool | None = typer.Option(
        None, "--structured/--no-structured", help="constrain verdicts (vLLM)"
    ),
    policy_url: str | None = typer.Option(None, "--policy-url", help="policy service for policy:* judges"),
    self_model: str | None = typer.Option(None, "--self-model", help="served name policy:self resolves to"),
    redis_url: str | None = typer.Option(
        os.environ.get("REDIS_URL"),
        "--redis-url",
        help="verdict cache and shared backend limits (default $REDIS_URL; unset: in-process)",
    ),
) -> None:
    """Score every answer in FILE; already-judged records in --out are skipped."""
    from selfreward.judging import make_run_judge
    from selfreward.judging.files import judge_candidates
    from selfreward.progress import Progress

    run_config, spec = _setup(config, judge, samples, mode, structured)
    the_judge = make_run_judge(
        spec, run_config, policy_url=policy_url, self_model=self_model, redis_url=redis_url
    )
    with RichProgressSink() as sink:
        counts = judge_candidates(file, out, the_judge, Progress(sink))
    rows = [(k, v) for k, v in counts.items() if not isinstance(v, dict)]
    rows += [(f"failures: {k}", v) for k, v in sorted(counts["failure_kinds"].items())]
    print_table(f"judgments -> {out}", ["", "value"], rows)


@app.command("compare")
@friendly_errors
def compare(
    file: Path = typer.Argument(
        ..., help="rows {instruction|prompt, response_a|output_1, response_b|output_2, id?}"
    ),
    judge: str | None = typer.Option(None, "--judge", "-j", help=JUDGE_HELP),
    out: Path = typer.Option(Path("comparisons.jsonl"), "--out", "-o", help="comparisons (resumable)"),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="run config YAML (judge/teacher sections)"
    ),
    mode: str | None = typer.Option(None, "--mode", help="sample | logprob"),
    policy_url: str | None = typer.Option(None, "--policy-url", help="policy service for policy:* judges"),
    self_model: str | None = typer.Option(None, "--self-model", help="served name policy:self resolves to"),
    redis_url: str | None = typer.Option(os.environ.get("REDIS_URL"), "--redis-url", help="verdict cache"),
) -> None:
    """Compare answer A with answer B for every row of FILE, in both orders."""
    import asyncio

    from selfreward.judging import make_run_judge
    from selfreward.judging.files import acompare_rows
    from selfreward.progress import Progress

    run_config, spec = _setup(config, judge, None, mode, None)
    the_judge = make_run_judge(
        spec, run_config, policy_url=policy_url, self_model=self_model, redis_url=redis_url
    )

    async def go() -> dict[str, Any]:
        try:
            return await acompare_rows(file, out, the_judge, Progress(sink))
        finally:
            await the_judge.aclose()

    with RichProgressSink() as sink:
        counts = asyncio.run(go())
    outcome = counts.pop("outcome_this_run")
    rows = [(k, v) for k, v in counts.items()] + [(f"this run: {k}", v) for k, v in outcome.items()]
    print_table(f"comparisons -> {out}", ["", "value"], rows)


@app.command("parse")
def parse(text: str = typer.Argument(..., help="a verdict text")) -> None:
    """Show how a verdict is read (the strict 'Score: N' rule)."""
    from selfreward.judging import parse_score

    value, failure = parse_score(text)
    console.print(f"score={value} failure={failure}", markup=False)
