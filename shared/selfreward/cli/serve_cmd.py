"""`selfreward serve ...`: run the HTTP services (judge; other areas add theirs here)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from selfreward.cli.ui import friendly_errors

app = typer.Typer(help="Run the HTTP services.", no_args_is_help=True)


@app.command("judge")
@friendly_errors
def judge(
    host: str = typer.Option("127.0.0.1", "--host", help="bind address (0.0.0.0 in containers)"),
    port: int = typer.Option(8100, "--port", min=1, max=65535),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="run config YAML (default $SELFREWARD_CONFIG; judge/teacher sections)"
    ),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """The judge service: POST /v1/score, POST /v1/compare, GET /healthz, GET /metrics (docs/judge.md).

    Settings from the environment: REDIS_URL, POLICY_URL, SELFREWARD_SELF_MODEL,
    SELFREWARD_DEFAULT_JUDGE, SELFREWARD_API_TOKEN.
    """
    import uvicorn

    from selfreward.api.judge.app import create_app
    from selfreward.api.judge.settings import JudgeSettings

    env = dict(os.environ)
    if config is not None:
        env["SELFREWARD_CONFIG"] = str(config)
    app_ = create_app(JudgeSettings.from_env(env))
    uvicorn.run(app_, host=host, port=port, log_level=log_level)


@app.command("coordinator")
@friendly_errors
def coordinator(
    host: str = typer.Option("127.0.0.1", "--host", help="bind address (0.0.0.0 in containers)"),
    port: int = typer.Option(8080, "--port", min=1, max=65535),
    redis_url: str | None = typer.Option(None, "--redis-url", help="default $REDIS_URL"),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """The coordinator: REST API for runs and iterations (docs/api.md; OpenAPI at /docs).

    Settings from the environment: REDIS_URL, SELFREWARD_API_TOKEN (bearer token for mutating
    routes), and SELFREWARD_* config overrides applied to every posted run config (e.g.
    SELFREWARD_ARTIFACT_ROOT, SELFREWARD_SERVICES__POLICY_URL).
    """
    import uvicorn

    from selfreward.api.coordinator.app import create_app

    uvicorn.run(create_app(redis_url=redis_url), host=host, port=port, log_level=log_level)
