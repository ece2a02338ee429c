"""`selfreward data ...`: prepare the seed data (IFT, EFT-train, EFT-eval) from OASST1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from selfreward.cli.ui import RichProgressSink, console, err_console, friendly_errors, print_table
from selfreward.config import RunConfig, command_config
from selfreward.errors import ConfigError, InputError
from selfreward.storage import RunLayout, read_manifest

app = typer.Typer(help="Prepare seed data from OASST1 (IFT, EFT-train, EFT-eval).", no_args_is_help=True)


def _run_config(config_file: Path | None, overrides: dict[str, Any]) -> tuple[RunConfig, Path | None]:
    """The run config (or the defaults, with SELFREWARD_* overrides) with the data options given on
    the command line applied. Returns (config, the run's seed folder if a config file was given)."""
    run = command_config(config_file, data=overrides)
    seed_dir = RunLayout(run.artifact_root, run.name).seed_dir if config_file is not None else None
    return run, seed_dir


def _print_manifest(manifest: Any, out: Path) -> None:
    from selfreward.data.seed import drop_table

    rows = [(name, info.records, info.sha256[:12]) for name, info in manifest.outputs.items()]
    print_table(f"seed data in {out}", ["file", "records", "sha256"], rows)
    c, s = manifest.counts, manifest.split
    print_table(
        "counts",
        ["what", "count"],
        [
            ("messages read", c["messages"]),
            ("first-turn prompts", c["first_turn_prompts"]),
            (
                "prompts kept (train / eval trees)",
                f"{c['prompts_kept']} ({c['prompts_train']} / {c['prompts_eval']})",
            ),
            ("EFT-train prompts", c["eft_train_prompts"]),
            ("EFT-eval replies", c["eft_eval_replies"]),
            ("split", f"eval_fraction={s['eval_fraction']} salt={s['split_salt']!r}"),
            ("EFT targets", manifest.eft_targets["mode"]),
        ],
    )
    drops = drop_table(manifest)
    if drops:
        print_table("dropped, by reason", ["reason", "unit", "count", "meaning"], drops)
    else:
        console.print("nothing dropped")
    if manifest.orphans["messages"] or manifest.cycles["count"]:
        console.print(
            f"orphans: {manifest.orphans['messages']} (e.g. {manifest.orphans['examples']}); "
            f"cycles: {manifest.cycles['count']} (e.g. {manifest.cycles['examples']})",
            markup=False,
        )
    if manifest.unknown_roles:
        console.print(f"unknown roles (counted, not used): {manifest.unknown_roles}", markup=False)
    for warning in manifest.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}")


@app.command("prepare")
@friendly_errors
def prepare(
    source: str | None = typer.Option(
        None,
        "--source",
        "-s",
        help="'demo', a local OASST file (trees or per-message; .jsonl[.gz]/.parquet), "
        "or hf:OpenAssistant/oasst1[@revision] [default: data.source, else demo]",
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="output folder [default: the run's seed/ with --config]"
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="run config YAML: take the data settings from it"
    ),
    languages: str | None = typer.Option(None, help="comma-separated language codes, e.g. en,de"),
    eval_fraction: float | None = typer.Option(None, help="share of trees in the eval split"),
    split_salt: str | None = typer.Option(None, help="salt of the tree-id hash split"),
    max_ift: int | None = typer.Option(None, help="cap on IFT rows"),
    max_eft_train: int | None = typer.Option(None, help="cap on EFT-train rows"),
    max_eft_eval: int | None = typer.Option(None, help="cap on EFT-eval prompts"),
    eft_targets: str | None = typer.Option(None, help="rank | judge-filtered"),
    eft_judge: str | None = typer.Option(
        None, help="judge of judge-filtered targets: policy:<model>, gemini:<model> or openai:<url>#<model>"
    ),
    judge_concurrency: int = typer.Option(4, min=1, help="judge requests in flight (judge-filtered)"),
    force: bool = typer.Option(False, "--force", help="rebuild even when the folder is up to date"),
) -> None:
    """Write ift.jsonl, eft_train.jsonl, eft_eval.jsonl and manifest.json, and print the counts."""
    import asyncio

    from selfreward.data.seed import SeedManifest, aprepare_seed
    from selfreward.progress import Progress

    langs = [x.strip() for x in languages.split(",") if x.strip()] if languages is not None else None
    run, seed_dir = _run_config(
        config,
        {
            "source": source, "languages": langs, "eval_fraction": eval_fraction, "split_salt": split_salt,
            "max_ift": max_ift, "max_eft_train": max_eft_train, "max_eft_eval": max_eft_eval,
            "eft_targets": eft_targets, "eft_judge": eft_judge,
        },
    )  # fmt: skip
    out_dir = out or seed_dir
    if out_dir is None:
        raise ConfigError(
            ["--out is required (or --config, to write into the run's seed/ folder)"], "command line"
        )
    judge = None
    if run.data.eft_targets == "judge-filtered":
        from selfreward.data.eft_judge import eft_judge_for

        judge = eft_judge_for(run)

    async def prepare(progress: Progress) -> SeedManifest:
        try:
            return await aprepare_seed(
                run.data, out_dir, progress, judge=judge, judge_concurrency=judge_concurrency, force=force
            )
        finally:
            if judge is not None:
                await judge.aclose()

    with RichProgressSink(transient=True) as sink:
        manifest = asyncio.run(prepare(Progress(sink)))
    if manifest.reused:
        console.print(
            f"up to date: {out_dir} already holds this result (same input sha256 and settings); --force rebuilds",
            markup=False,
        )
    _print_manifest(manifest, out_dir)


@app.command("show")
@friendly_errors
def show(folder: Path = typer.Argument(..., help="a seed folder written by `data prepare`")) -> None:
    """Print the counts and drop reasons of a prepared seed folder (its manifest.json)."""
    from selfreward.data.seed import MANIFEST_FILE, SeedManifest

    data = read_manifest(folder / MANIFEST_FILE)
    if data is None:
        raise InputError(f"{folder / MANIFEST_FILE}: not found (run `selfreward data prepare` first)")
    _print_manifest(SeedManifest.model_validate(data), folder)
