"""`selfreward report RUN`: one self-contained HTML page for a run (selfreward.reports.run_report)."""

from __future__ import annotations

from pathlib import Path

import typer

from selfreward.cli.ui import console, friendly_errors


@friendly_errors
def report(
    run: str = typer.Argument(..., help="run name (runs/<run> under the artifact root)"),
    root: Path | None = typer.Option(
        None, "--root", help="artifact root (default: the config's artifact_root, SELFREWARD_ARTIFACT_ROOT)"
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help="run config giving the artifact root"),
    out: Path | None = typer.Option(None, "--out", "-o", help="HTML file (default runs/<run>/report.html)"),
) -> None:
    """Build one HTML page for a run: every iteration's counts, metrics and plots."""
    from selfreward.config import command_config
    from selfreward.reports.run_report import build_run_report
    from selfreward.storage import RunLayout

    if root is None:
        cfg = command_config(config)
        root = cfg.artifact_root
    path = build_run_report(RunLayout(root, run), out)
    console.print(f"wrote {path}", highlight=False)
