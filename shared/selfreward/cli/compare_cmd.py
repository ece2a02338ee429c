"""`selfreward compare RUN_A RUN_B ...`: runs of different methods side by side, per iteration
(selfreward.reports.compare)."""

from __future__ import annotations

from pathlib import Path

import typer

from selfreward.cli.ui import console, friendly_errors, print_table


@friendly_errors
def compare(
    runs: list[str] = typer.Argument(..., help="two or more run names (runs/<run> under the artifact root)"),
    root: Path | None = typer.Option(
        None, "--root", help="artifact root (default: the config's artifact_root, SELFREWARD_ARTIFACT_ROOT)"
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help="run config giving the artifact root"),
    html: Path | None = typer.Option(None, "--html", help="also write the table as one HTML page"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the comparison as JSON"),
) -> None:
    """Win rates against the fixed baseline (with intervals and length-controlled), judge
    agreement with humans, collapse indicators, pairs by kind and wall time per stage, per
    iteration; runs whose configs differ beyond the method are flagged as not comparable."""
    from selfreward.config import command_config
    from selfreward.reports.compare import COLUMNS, compare_runs, rows_of, write_compare
    from selfreward.storage import RunLayout

    if root is None:
        root = command_config(config).artifact_root
    data = compare_runs([RunLayout(root, r) for r in runs])
    print_table("runs compared", COLUMNS, rows_of(data))
    if data["comparable"]:
        console.print("comparable: the runs differ only in the method; same fixed baseline weights")
    else:
        for reason in data["not_comparable_because"]:
            console.print(f"[bold red]not comparable[/]: {reason}", highlight=False, soft_wrap=True)
        for d in data["config_differences"]:
            values = ", ".join(f"{run}={value!r}" for run, value in d["values"].items())
            console.print(f"  {d['field']}: {values}", highlight=False, soft_wrap=True)
    write_compare(data, html, json_out)
    for path in (html, json_out):
        if path is not None:
            console.print(f"wrote {path}", highlight=False)
