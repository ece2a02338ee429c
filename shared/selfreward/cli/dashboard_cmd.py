"""`selfreward ui [ARTIFACT_ROOT]`: the dashboard over an artifact folder (the embedded mode's runs)."""

from __future__ import annotations

from pathlib import Path

import typer

from selfreward.cli.ui import console, friendly_errors

DEFAULT_PORT = 8765


def open_command(artifact_root: Path, port: int = DEFAULT_PORT) -> str:
    """The command that opens the dashboard of the runs under `artifact_root` (printed by `run`)."""
    return f"selfreward ui {artifact_root} --port {port}"


@friendly_errors
def ui(
    artifact_root: Path = typer.Argument(Path("artifacts"), help="the artifact root (holds runs/<name>/)"),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="0: a free port"),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="loopback by default; the pages are read-only but show every run"
    ),
) -> None:
    """Serve the dashboard (runs, live stage progress, metrics, data browser) of an artifact folder.

    Read-only: it reads the manifests, progress files and JSONL files of runs/<name>/ and never
    writes. Open http://HOST:PORT/ui/ in a browser."""
    import uvicorn

    from selfreward.dashboard.app import create_app
    from selfreward.errors import InputError

    if not (artifact_root / "runs").is_dir():
        raise InputError(f"{artifact_root}: no runs/ folder (give the run config's artifact_root)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(
            f"[yellow]warning[/]: serving on {host}: anyone who reaches this port reads every run's "
            "config and data (the pages are read-only, there is no login)"
        )
    config = uvicorn.Config(create_app(artifact_root), host=host, port=port, log_level="warning")
    server = uvicorn.Server(config)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host

    async def serve() -> None:
        import asyncio

        task = asyncio.ensure_future(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            bound = server.servers[0].sockets[0].getsockname()[1]
            console.print(f"dashboard of {artifact_root}: http://{shown}:{bound}/ui/ (Ctrl-C stops it)")
        await task

    import asyncio

    asyncio.run(serve())
