"""`selfreward stack up | status | down`: the distributed mode on one machine (selfreward.stack)."""

from __future__ import annotations

from pathlib import Path

import typer

from selfreward.cli.ui import console, friendly_errors, print_table

app = typer.Typer(
    help="Run the distributed mode on this machine (Redis, policy, judge, coordinator, workers)."
)

DIR_HELP = "the stack's folder: stack.json, logs/, redis/ (default .selfreward-stack)"


def _say(message: str) -> None:
    """One line of what the stack does, never hard-wrapped (paths and commands stay copyable)."""
    console.print(message, highlight=False, soft_wrap=True)


@app.command("up")
@friendly_errors
def stack_up(
    config: Path = typer.Option(..., "--config", "-c", help="run config YAML (model, judge, artifact root)"),
    folder: Path = typer.Option(Path(".selfreward-stack"), "--dir", help=DIR_HELP),
    policy_url: str | None = typer.Option(
        None, "--policy-url", help="use this policy server instead of starting one (e.g. on a GPU host)"
    ),
    policy_timeout_s: float = typer.Option(900.0, "--policy-timeout", help="seconds to wait for vLLM"),
) -> None:
    """Start every service on loopback, wait until all answer, print how to POST a run."""
    from selfreward import stack

    s = stack.up(
        config,
        folder,
        policy_url=policy_url,
        policy_timeout_s=policy_timeout_s,
        say=_say,
    )
    d = Path(s.dir)
    console.print(
        f"\n[bold]stack up[/] in {d} (stack.json holds each service's URL, PID and log; keep it private)\n"
        f"  API={s.api}\n  TOKEN=$(python -c \"import json; print(json.load(open('{d / 'stack.json'}'))['token'])\")\n"
        f"  curl -s -X POST $API/runs -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' "
        f"-d @{d / 'run.json'}\n"
        f'  curl -s -X POST $API/runs/<run>/iterations -H "Authorization: Bearer $TOKEN"\n'
        f'  curl -s -H "Authorization: Bearer $TOKEN" $API/runs/<run>/iterations/1\n'
        f"  dashboard: {s.api}/ui/ (it asks for the token)\n"
        f"stop it: selfreward stack down --dir {d}",
        highlight=False,
        soft_wrap=True,
    )


@app.command("status")
@friendly_errors
def stack_status(folder: Path = typer.Option(Path(".selfreward-stack"), "--dir", help=DIR_HELP)) -> None:
    """Each service of the stack: PID, URL, running, answering, log."""
    from selfreward import stack

    rows = stack.status(folder)
    if not rows:
        console.print(f"no stack in {folder.resolve()}")
        raise typer.Exit(1)
    print_table(
        f"stack in {folder.resolve()}",
        ["service", "pid", "url", "running", "answering", "log"],
        [(r["service"], r["pid"], r["url"] or "", r["running"], r["answering"], r["log"]) for r in rows],
    )
    if not all(r["answering"] for r in rows):
        raise typer.Exit(1)


@app.command("down")
@friendly_errors
def stack_down(
    folder: Path = typer.Option(Path(".selfreward-stack"), "--dir", help=DIR_HELP),
    grace_s: float = typer.Option(30.0, "--grace", help="seconds between SIGTERM and SIGKILL"),
) -> None:
    """Stop exactly the processes the stack started (workers first, Redis last)."""
    from selfreward import stack

    stack.down(folder, grace_s=grace_s, say=_say)
