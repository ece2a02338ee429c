"""`selfreward` command line: one typer app, a sub-app per area.

Each area's commands live in their own module (config_cmd, data_cmd, policy_cmd, judge_cmd,
train_cmd, run_cmd, eval_cmd, serve_cmd, dashboard_cmd). Modules import heavy libraries (torch, vLLM, TRL)
inside the command functions, so `selfreward --help` stays fast.
"""

from __future__ import annotations

import typer

from selfreward import __version__
from selfreward.cli import (
    compare_cmd,
    config_cmd,
    dashboard_cmd,
    data_cmd,
    eval_cmd,
    judge_cmd,
    logs_cmd,
    methods_cmd,
    policy_cmd,
    report_cmd,
    run_cmd,
    serve_cmd,
    stack_cmd,
    train_cmd,
)

app = typer.Typer(
    name="selfreward",
    help="Align small language models with online AI feedback (self-rewarding, teacher-reward, "
    "teacher-demonstration DPO).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(config_cmd.app, name="config")
app.add_typer(policy_cmd.app, name="policy")
app.add_typer(judge_cmd.app, name="judge")
app.add_typer(serve_cmd.app, name="serve")
app.add_typer(stack_cmd.app, name="stack")
app.add_typer(data_cmd.app, name="data")
app.add_typer(eval_cmd.app, name="eval")
app.command("report")(report_cmd.report)
app.command("run")(run_cmd.run)
app.command("methods")(methods_cmd.methods)
app.command("logs")(logs_cmd.logs)
app.command("compare")(compare_cmd.compare)
app.command("ui")(dashboard_cmd.ui)
app.add_typer(train_cmd.app, name="train")
app.add_typer(train_cmd.worker_app, name="worker")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
