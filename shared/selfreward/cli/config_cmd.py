"""`selfreward config ...`: validate and show run configurations."""

from __future__ import annotations

from pathlib import Path

import typer

from selfreward.cli.ui import console, friendly_errors
from selfreward.config import dump_config, load_config

app = typer.Typer(help="Validate and show run configurations.", no_args_is_help=True)


@app.command("validate")
@friendly_errors
def validate(file: Path = typer.Argument(..., help="run config YAML")) -> None:
    """Print the resolved config (YAML + SELFREWARD_* overrides), or every error with its field path."""
    config = load_config(file)
    console.print(dump_config(config), markup=False, highlight=False, end="")


@app.command("reference")
def reference() -> None:
    """Print the configuration reference (Markdown; docs/configuration.md)."""
    from selfreward.config import reference_markdown

    typer.echo(reference_markdown(), nl=False)
