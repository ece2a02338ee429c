"""`selfreward eval ...`: reward-modeling agreement, head-to-head and AlpacaEval-style win rates,
and the judge benchmark against human-labelled preference sets.

Every command prints its tables and writes report.json + report.md + PNG plots
(docs/evaluation.md defines each metric).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from selfreward.cli.ui import RichProgressSink, console, friendly_errors, print_table

app = typer.Typer(
    help=(
        "Evaluate models and judges: reward-model agreement, head-to-head, AlpacaEval, judge benchmark "
        "(docs/evaluation.md)."
    ),
    no_args_is_help=True,
)

JUDGE_HELP = "policy:<served-name> | gemini:<model> | openai:<base_url>#<model>"
SIDE_HELP = "an answers file (JSON list or JSONL of {instruction, output}) or a served model name"
PROMPTS_HELP = (
    "ift-eval | alpaca_eval:<file> | mt_bench:<file> | <jsonl/json file with instruction or prompt>"
)


def _config(path: Path | None) -> Any:
    from selfreward.config import command_config

    return command_config(path)


def _settings(config: Any, max_tokens: int | None, temperature: float | None) -> Any:
    from selfreward.evaluation.answers import GenerationSettings

    return GenerationSettings(
        max_tokens=max_tokens or config.eval.max_tokens,
        temperature=config.eval.temperature if temperature is None else temperature,
        top_p=config.eval.top_p,
        seed=config.seed,
    )


def _prompts(config: Any, spec: str, max_prompts: int | None) -> Any:
    from selfreward.evaluation.prompt_sets import load_prompt_set
    from selfreward.storage import RunLayout

    seed_dir = RunLayout(config.artifact_root, config.name).seed_dir
    return load_prompt_set(spec, seed_dir=seed_dir, max_prompts=max_prompts, seed=config.seed)


def _fmt(value: Any, percent: bool = True) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def print_reward_model(data: dict[str, Any]) -> None:
    from selfreward.reports.markdown import HUMAN_ROWS, REFERENCE_ROWS

    rows_spec = HUMAN_ROWS if data["reference"] == "human-ranks" else REFERENCE_ROWS
    ex = data["excluding_unparseable"]
    rows = []
    for label, key, fmt in rows_spec:
        if key == "correlation_prompts":
            continue
        rows.append([label, fmt(data[key]), fmt(ex[key])])
    print_table(
        "Reward-model agreement", ["metric", "all scores (unparseable = -1)", "excluding unparseable"], rows
    )
    console.print(
        f"parse-failure rate: {_fmt(data['parse_failure_rate'])} ({data['parse_failures']} of "
        f"{data['responses_compared']} responses)"
        + (
            f"; reference: {_fmt(data['reference_parse_failure_rate'])}"
            if data["reference"] == "reference-judge"
            else ""
        ),
        highlight=False,
    )
    console.print(
        f"prompts compared: {data['prompts_compared']}; only in the scores: {data['prompts_only_in_scores']}; "
        f"only in the reference: {data['prompts_only_in_reference']}",
        highlight=False,
    )


def print_head2head(data: dict[str, Any], title: str = "Head-to-head") -> None:
    from selfreward.reports.markdown import interval, pct

    iv = data["intervals"]
    print_table(
        f"{title}: {data['a']} (A) vs {data['b']} (B), {data['n']} prompts, judge {data.get('judge')}",
        ["outcome", "share", "95% interval", "prompts"],
        [
            ["win", pct(data["win"]), interval(iv["win"]), data["wins"]],
            ["tie", pct(data["tie"]), interval(iv["tie"]), data["ties"]],
            ["loss", pct(data["loss"]), interval(iv["loss"]), data["losses"]],
            ["win rate", pct(data["win_rate"]), interval(iv["win_rate"]), ""],
        ],
    )
    if data["failures"]:
        console.print(f"judging failed on {data['failures']} prompt(s) (excluded)", highlight=False)


@app.command("reward-model")
@friendly_errors
def reward_model(
    scores: Path = typer.Option(..., "--scores", help="the judge's scores (JSONL {prompt_id, completion})"),
    reference: Path | None = typer.Option(
        None, "--reference", help="a reference judge's scores, same format"
    ),
    human: Path | None = typer.Option(
        None, "--human", help="EFT-eval records with human ranks (eft_eval.jsonl)"
    ),
    json_out: Path | None = typer.Option(None, "--json", help="write the metrics as JSON here"),
    out_dir: Path | None = typer.Option(
        None, "--out-dir", help="write report.json, report.md and plots here"
    ),
) -> None:
    """Agreement of a judge's scores with a reference judge's scores or with human ranks."""
    from selfreward.errors import InputError
    from selfreward.evaluation.reward_model import reward_model_eval, reward_model_report
    from selfreward.storage import atomic_write_json

    if (reference is None) == (human is None):
        raise InputError("give exactly one of --reference (a reference judge's scores) or --human (EFT eval)")
    report = reward_model_eval(scores, reference_path=reference, human_path=human)
    data = {"kind": "reward-model", **report.to_json()}
    print_reward_model(data)
    if json_out is not None:
        atomic_write_json(json_out, data)
        console.print(f"wrote {json_out}", highlight=False)
    if out_dir is not None:
        paths = reward_model_report(out_dir, report)
        console.print(f"wrote {paths['markdown']} and plots in {out_dir}", highlight=False)


@app.command("score-eft")
@friendly_errors
def score_eft_cmd(
    judge: str = typer.Option(..., "--judge", "-j", help=JUDGE_HELP),
    eft: Path = typer.Option(..., "--eft", help="EFT-eval records (a run's seed/eft_eval.jsonl)"),
    out: Path = typer.Option(
        ..., "--out", "-o", help="scores JSONL for `eval reward-model --human` (resumable)"
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help="run config (judge, teacher sections)"),
    policy_url: str | None = typer.Option(None, "--policy-url", help="policy server for policy:* judges"),
    redis_url: str | None = typer.Option(
        None, "--redis-url", help="verdict cache and shared backend limits; default: in-process"
    ),
    max_prompts: int | None = typer.Option(None, "--max-prompts", min=1, help="seeded subset of records"),
    samples: int | None = typer.Option(None, "--samples", "-k", min=1, help="verdicts per reply (K)"),
) -> None:
    """Score every reply of the EFT-eval records with a judge (Judge.score), in the scores format."""
    import asyncio

    from selfreward.evaluation.prompt_sets import seeded_subset
    from selfreward.evaluation.reward_model import score_eft
    from selfreward.judging import make_run_judge
    from selfreward.progress import Progress
    from selfreward.schemas import EFTEvalRecord, read_records

    cfg = _config(config)
    records = seeded_subset(read_records(eft, EFTEvalRecord), max_prompts, cfg.seed)

    async def go() -> Any:
        j = make_run_judge(judge, cfg, policy_url=policy_url, redis_url=redis_url)
        try:
            with RichProgressSink() as sink:
                return await score_eft(
                    j, records, judge_name=j.name, out_path=out, samples=samples, progress=Progress(sink)
                )
        finally:
            await j.aclose()

    scored = asyncio.run(go())
    if scored.retry_later:
        console.print(
            f"{len(scored.retry_later)} record(s) hit transient judge failures and were not written "
            f"(e.g. {scored.retry_later[0]}); run the command again to score them",
            highlight=False,
        )
    console.print(
        f"wrote {out} ({scored.written} records); next: selfreward eval reward-model --scores {out} "
        f"--human {eft}",
        highlight=False,
    )


@app.command("head2head")
@friendly_errors
def head2head(
    a: str = typer.Option(..., "--a", help=f"model A: {SIDE_HELP}"),
    b: str = typer.Option(..., "--b", help=f"model B: {SIDE_HELP}"),
    judge: str = typer.Option(..., "--judge", "-j", help=JUDGE_HELP),
    prompts: str = typer.Option(..., "--prompts", help=PROMPTS_HELP),
    out_dir: Path = typer.Option(
        Path("eval-head2head"), "--out-dir", "-o", help="answers, verdicts, reports"
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="run config (judge, teacher, eval sections)"
    ),
    policy_url: str | None = typer.Option(None, "--policy-url", help="policy server generating answers"),
    redis_url: str | None = typer.Option(
        None, "--redis-url", help="verdict cache and shared backend limits; default: in-process"
    ),
    max_prompts: int | None = typer.Option(None, "--max-prompts", min=1, help="seeded subset of prompts"),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", min=8, help="answer length (default eval.max_tokens)"
    ),
    temperature: float | None = typer.Option(None, "--temperature", min=0.0, help="default eval.temperature"),
    bootstrap: int | None = typer.Option(None, "--bootstrap", min=100, help="bootstrap resamples"),
) -> None:
    """A against B on the same prompts; the judge compares each pair in both orders."""
    import asyncio

    from selfreward.evaluation.answers import resolve_side
    from selfreward.evaluation.head2head import head2head_report, run_head2head
    from selfreward.judging import make_run_judge
    from selfreward.llm.openai import OpenAICompatClient
    from selfreward.progress import Progress

    cfg = _config(config)
    side_a, side_b = resolve_side(a), resolve_side(b)
    if side_a.name == side_b.name:
        side_b = resolve_side(b, f"{side_b.name}-b")
    items = _prompts(cfg, prompts, max_prompts)
    url = policy_url or cfg.services.policy_url

    async def go() -> dict[str, Any]:
        client = None
        if not (side_a.is_file and side_b.is_file):
            client = OpenAICompatClient(
                url, concurrency=cfg.eval.concurrency, timeout_s=cfg.services.request_timeout_s
            )
        j = make_run_judge(judge, cfg, policy_url=url, redis_url=redis_url)
        try:
            with RichProgressSink() as sink:
                return await run_head2head(
                    side_a,
                    side_b,
                    items,
                    judge=j,
                    judge_name=j.name,
                    client=client,
                    work_dir=out_dir,
                    settings=_settings(cfg, max_tokens, temperature),
                    bootstrap_samples=bootstrap or cfg.eval.bootstrap_samples,
                    seed=cfg.seed,
                    prompts_spec=prompts,
                    progress=Progress(sink),
                )
        finally:
            await j.aclose()
            if client is not None:
                await client.aclose()

    data = asyncio.run(go())
    paths = head2head_report(out_dir, data)
    print_head2head(data)
    console.print(f"wrote {paths['json']}, {paths['markdown']}", highlight=False)


@app.command("alpaca")
@friendly_errors
def alpaca(
    model: str = typer.Option(..., "--model", "-m", help=SIDE_HELP),
    reference: Path | None = typer.Option(
        None, "--reference", help="reference outputs (AlpacaEval JSON, e.g. gpt4_1106_preview.json)"
    ),
    judge: str | None = typer.Option(None, "--judge", "-j", help=f"{JUDGE_HELP}; omit to only export"),
    prompts: str | None = typer.Option(
        None, "--prompts", help=f"default: the reference's instructions; {PROMPTS_HELP}"
    ),
    generator: str | None = typer.Option(None, "--generator", help="generator name in the export"),
    out_dir: Path = typer.Option(
        Path("eval-alpaca"), "--out-dir", "-o", help="model_outputs.json, verdicts, reports"
    ),
    difficulty: Path | None = typer.Option(
        None,
        "--difficulty",
        help="instruction difficulties for the LC fit (AlpacaEval's instruction_difficulty.csv)",
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="run config (judge, teacher, eval sections)"
    ),
    policy_url: str | None = typer.Option(None, "--policy-url", help="policy server generating answers"),
    redis_url: str | None = typer.Option(
        None, "--redis-url", help="verdict cache and shared backend limits; default: in-process"
    ),
    max_prompts: int | None = typer.Option(
        None, "--max-prompts", min=1, help="seeded subset of instructions"
    ),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", min=8, help="answer length (default eval.max_tokens)"
    ),
) -> None:
    """Export outputs in AlpacaEval's format; with --reference and --judge, win rate and LC win rate."""
    import asyncio

    from selfreward.errors import InputError
    from selfreward.evaluation.alpaca_eval import alpaca_report, reference_prompts, run_alpaca
    from selfreward.evaluation.answers import resolve_side
    from selfreward.evaluation.metrics.alpaca import read_difficulty, read_outputs
    from selfreward.judging import make_run_judge
    from selfreward.llm.openai import OpenAICompatClient
    from selfreward.progress import Progress

    cfg = _config(config)
    if judge is not None and reference is None:
        raise InputError("--judge needs --reference (the outputs to compare against)")
    if prompts is None and reference is None:
        raise InputError("give --prompts, or --reference (its instructions are the prompts)")
    side = resolve_side(model, generator)
    ref_outputs = read_outputs(reference) if reference is not None else None
    if prompts is not None:
        items = _prompts(cfg, prompts, max_prompts)
    else:
        assert ref_outputs is not None
        items = reference_prompts(ref_outputs, max_prompts, cfg.seed)
    diff = read_difficulty(difficulty, ref_outputs) if difficulty is not None and ref_outputs else None
    url = policy_url or cfg.services.policy_url

    async def go() -> dict[str, Any]:
        client = (
            None
            if side.is_file
            else OpenAICompatClient(
                url, concurrency=cfg.eval.concurrency, timeout_s=cfg.services.request_timeout_s
            )
        )
        j = make_run_judge(judge, cfg, policy_url=url, redis_url=redis_url) if judge else None
        try:
            with RichProgressSink() as sink:
                return await run_alpaca(
                    side,
                    items,
                    work_dir=out_dir,
                    client=client,
                    settings=_settings(cfg, max_tokens, None),
                    reference_path=reference,
                    judge=j,
                    judge_name=j.name if j is not None else None,
                    difficulty=diff,
                    bootstrap_samples=cfg.eval.bootstrap_samples,
                    seed=cfg.seed,
                    progress=Progress(sink),
                )
        finally:
            if j is not None:
                await j.aclose()
            if client is not None:
                await client.aclose()

    data = asyncio.run(go())
    paths = alpaca_report(out_dir, data)
    console.print(
        f"exported {data['instructions']} outputs to {data['model_outputs']} "
        f"(official tool: alpaca_eval --model_outputs {data['model_outputs']})",
        highlight=False,
    )
    if data.get("win_rate"):
        wr, lc = data["win_rate"], data.get("length_controlled") or {}
        print_table(
            f"AlpacaEval-style: {data['generator']} vs {data['reference_generator']}, judge {data['judge']}",
            ["metric", "value", "standard error", "n"],
            [
                ["win rate", _fmt(wr["win_rate"]), _fmt(wr["standard_error"]), wr["n"]],
                [
                    lc.get("label", "length-controlled win rate"),
                    _fmt(lc.get("win_rate")),
                    "",
                    lc.get("n", ""),
                ],
            ],
        )
    console.print(f"wrote {paths['json']}, {paths['markdown']}", highlight=False)


BENCH_HELP = "a human-labelled preference set: a JSON/JSONL file, a folder of them (LLMBar), or hf:<repo>[@<config>][:<split>]"


@app.command("judge")
@friendly_errors
def judge_bench(
    bench: str = typer.Option(..., "--bench", "-b", help=BENCH_HELP),
    judges: list[str] = typer.Option(
        [],
        "--judge",
        "-j",
        help=f"{JUDGE_HELP} | length:longer | length:shorter | random:<seed> (repeatable)",
    ),
    mode: str = typer.Option(
        "pointwise", "--mode", help="pointwise (5-point scores) | pairwise (both orders)"
    ),
    fmt: str | None = typer.Option(
        None, "--format", help="llmbar | pandalm | rewardbench | mtbench | generic (default: detected)"
    ),
    limit: int | None = typer.Option(None, "--limit", "-n", min=1, help="a seeded sample of at most N items"),
    out_dir: Path = typer.Option(
        ..., "--out", "-o", help="verdicts (resumable), report.json, report.md, plots"
    ),
    baselines: bool = typer.Option(
        True, "--baselines/--no-baselines", help="add length:longer, length:shorter and random:<seed>"
    ),
    name: str | None = typer.Option(
        None, "--name", help="the set's name in reports (default: from the source)"
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help="run config (judge, teacher, seed)"),
    policy_url: str | None = typer.Option(None, "--policy-url", help="policy server for policy:* judges"),
    redis_url: str | None = typer.Option(
        None, "--redis-url", help="verdict cache and shared backend limits; default: in-process"
    ),
    samples: int | None = typer.Option(
        None, "--samples", "-k", min=1, help="pointwise verdicts per response (K)"
    ),
    bootstrap: int | None = typer.Option(None, "--bootstrap", min=100, help="bootstrap resamples"),
    seed: int | None = typer.Option(
        None, "--seed", help="sample, bootstrap and random-baseline seed (config seed)"
    ),
) -> None:
    """Measure judges against human preference labels: accuracy with intervals, per subset, position and
    length bias, parse failures, cost (docs/evaluation.md#judge-benchmark)."""
    import asyncio

    from selfreward.errors import ConfigError
    from selfreward.evaluation.bench_sets import load_bench_set
    from selfreward.evaluation.judge_bench import (
        baseline_judge,
        bench_judges,
        default_baselines,
        write_bench_report,
    )
    from selfreward.judging import make_run_judge
    from selfreward.progress import Progress
    from selfreward.reports.markdown import BENCH_HEADER, bench_row

    if mode not in ("pointwise", "pairwise"):
        raise ConfigError([f"--mode {mode!r}: must be pointwise or pairwise"], "mode")
    cfg = _config(config)
    the_seed = cfg.seed if seed is None else seed
    data_set = load_bench_set(bench, fmt, name)
    specs = list(dict.fromkeys(judges))
    if not specs and not baselines:
        raise ConfigError(["give --judge (or keep the baselines)"], "judge")

    async def go() -> dict[str, Any]:
        built: list[Any] = []
        try:
            for spec in specs:
                built.append(
                    baseline_judge(spec)
                    or make_run_judge(spec, cfg, policy_url=policy_url, redis_url=redis_url)
                )
            if baselines:
                have = {j.name for j in built}
                built += [b for b in default_baselines(the_seed) if b.name not in have]
            with RichProgressSink() as sink:
                return await bench_judges(
                    data_set,
                    built,
                    mode=mode,  # type: ignore[arg-type]
                    out_dir=out_dir,
                    limit=limit,
                    seed=the_seed,
                    bootstrap_samples=bootstrap or cfg.eval.bootstrap_samples,
                    samples=samples,
                    progress=Progress(sink),
                )
        finally:
            for j in built:
                if hasattr(j, "aclose"):
                    await j.aclose()

    data = asyncio.run(go())
    paths = write_bench_report(out_dir, data)
    s = data["set"]
    console.print(
        f"{s['name']} ({s['format']}): {s['records']} records, {s['items']} judgeable, {s['sampled']} judged; "
        f"excluded: {', '.join(f'{k} {v}' for k, v in s['excluded'].items()) or 'none'}",
        highlight=False,
    )
    print_table(
        f"Judge benchmark: {s['name']}", BENCH_HEADER, [bench_row(j, quote=False) for j in data["judges"]]
    )
    retry = [j for j in data["judges"] if j["retry_later"]]
    for j in retry:
        console.print(
            f"{j['judge']}: {len(j['retry_later'])} item(s) hit backend failures and were not written; run again",
            highlight=False,
        )
    console.print(f"wrote {paths['json']}, {paths['markdown']}", highlight=False)
