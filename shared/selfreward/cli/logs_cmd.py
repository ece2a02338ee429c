"""`selfreward logs RUN T STAGE`: what the worker printed for a stage attempt (distributed mode;
the files under runs/<run>/logs/iter-<t>/ that GET /runs/{run}/iterations/{t}/stages/{stage}/log
serves)."""

from __future__ import annotations

from pathlib import Path

import typer

from selfreward.cli.ui import console, friendly_errors, print_table


@friendly_errors
def logs(
    run: str = typer.Argument(..., help="run name"),
    t: int = typer.Argument(..., help="iteration (0 = set-up)"),
    stage: str = typer.Argument(..., help="stage name (selfreward methods lists them)"),
    attempt: int | None = typer.Option(None, "--attempt", min=1, help="default: the last attempt"),
    tail: int | None = typer.Option(None, "--tail", min=0, help="only the last N lines"),
    list_: bool = typer.Option(False, "--list", help="list the attempts' log files"),
    root: Path | None = typer.Option(
        None, "--root", help="artifact root (default: the config's artifact_root, SELFREWARD_ARTIFACT_ROOT)"
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help="run config giving the artifact root"),
) -> None:
    """Print a stage attempt's log (the last attempt's by default)."""
    from selfreward.config import command_config
    from selfreward.drivers.stage_log import attempt_logs, read_log
    from selfreward.errors import InputError
    from selfreward.storage import RunLayout

    if root is None:
        root = command_config(config).artifact_root
    layout = RunLayout(root, run)
    found = attempt_logs(layout.stage_log(t, stage, 1).parent, stage)
    if list_:
        rows = [(n, p.stat().st_size, str(p)) for n, p in found.items()]
        print_table(f"{run} iteration {t}: {stage}", ["attempt", "bytes", "file"], rows)
        return
    number = attempt if attempt is not None else max(found, default=1)
    if number not in found:
        have = ", ".join(map(str, found)) or "none"
        raise InputError(
            f"no log of attempt {number} of {stage} in iteration {t} of {run} (attempts: {have})"
        )
    console.out(read_log(found[number], tail), end="", highlight=False)
