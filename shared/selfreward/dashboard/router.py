"""The dashboard's routes (a FastAPI APIRouter at /ui), the same under both entry points.

Pages (one HTML shell; static/app.js routes by the location, so every URL is linkable):
    /ui/, /ui/runs/{run}, /ui/runs/{run}/iterations/{t}, /ui/runs/{run}/iterations/{t}/data
Static files: /ui/static/{app.js, charts.js, app.css} (shipped with the package; no CDN).
JSON (read routes; behind the coordinator's token unless its reads are public):
    /ui/api/info                                   mode, writable (actions offered), auth
    /ui/api/runs                                   run summaries
    /ui/api/runs/{run}                             summary, config rows, the iteration timeline
    /ui/api/runs/{run}/iterations/{t}              stage states, progress, errors
    /ui/api/runs/{run}/metrics                     trends, training curves, wall time per stage
    /ui/api/runs/{run}/iterations/{t}/data         the data browser's page (byte-offset paging)
    /ui/api/runs/{run}/iterations/{t}/files/{name} a page of one JSONL file of the iteration
    /ui/api/runs/{run}/iterations/{t}/eval         evaluation examples side by side
Actions are the coordinator's own POST routes (/runs/{run}/iterations, .../resume, /cancel),
called by the page with the bearer token; the embedded mode offers none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import HTMLResponse, Response

from selfreward import __version__
from selfreward.dashboard.browse import MAX_LIMIT, BadOffset, DataQuery, eval_page, file_page, prompt_page
from selfreward.dashboard.files import OutsideRun
from selfreward.dashboard.metrics import run_metrics
from selfreward.dashboard.source import RunMissing, RunSource

STATIC = {"app.js": "text/javascript", "charts.js": "text/javascript", "app.css": "text/css"}

SHELL = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>selfreward dashboard</title><link rel="icon" href="data:,"><link rel="stylesheet" href="/ui/static/app.css?v={version}">
</head><body data-mode="{mode}"><header><a href="/ui/" class="brand">selfreward</a>
<nav id="crumbs"></nav><span id="mode" class="muted">{mode}</span><span id="auth"></span></header>
<div id="flash" role="status"></div><main id="main"><p class="muted">Loading...</p></main>
<script src="/ui/static/charts.js?v={version}"></script><script src="/ui/static/app.js?v={version}"></script>
</body></html>
"""


def static_text(name: str) -> str:
    return resources.files("selfreward.dashboard").joinpath("static", name).read_text(encoding="utf-8")


def _guard(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except RunMissing as exc:
        raise HTTPException(404, str(exc)) from None
    except OutsideRun as exc:
        raise HTTPException(404, f"not found: {exc}") from None
    except FileNotFoundError as exc:
        raise HTTPException(404, f"no such file: {exc.args[0] if exc.args else exc}") from None
    except BadOffset as exc:
        raise HTTPException(400, str(exc)) from None


def dashboard_router(
    source: RunSource, read_dependencies: Sequence[Any] = (), auth_required: bool = False
) -> APIRouter:
    router = APIRouter(prefix="/ui", include_in_schema=False)
    shell = SHELL.replace("{version}", __version__).replace("{mode}", source.mode)
    read = list(read_dependencies)

    def page() -> HTMLResponse:
        return HTMLResponse(shell)

    for path in ("", "/", "/runs/{run}", "/runs/{run}/iterations/{t}", "/runs/{run}/iterations/{t}/data"):
        router.add_api_route(path, page, methods=["GET"], response_class=HTMLResponse)

    @router.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(404, f"no static file {name!r}")
        return Response(static_text(name), media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    @router.get("/api/info")
    def info() -> dict[str, Any]:
        return {
            "mode": source.mode,
            "writable": source.writable,
            "auth_required": auth_required,
            "version": __version__,
        }

    @router.get("/api/runs", dependencies=read)
    def runs() -> list[dict[str, Any]]:
        return source.runs()

    @router.get("/api/runs/{run}", dependencies=read)
    def run(run: str) -> dict[str, Any]:
        return _guard(lambda: source.run(run))

    @router.get("/api/runs/{run}/iterations/{t}", dependencies=read)
    def iteration(run: str, t: int) -> dict[str, Any]:
        return _guard(lambda: source.iteration(run, t))

    @router.get("/api/runs/{run}/metrics", dependencies=read)
    def metrics(run: str) -> dict[str, Any]:
        def go() -> dict[str, Any]:
            config = source.config(run)
            layout = source.layout(run)
            return run_metrics(layout, config.variant, list(range(0, config.iterations + 1)))

        return _guard(go)

    @router.get("/api/runs/{run}/iterations/{t}/data", dependencies=read)
    def data(
        run: str,
        t: int,
        view: str = Query("pairs", pattern="^(pairs|prompts)$"),
        offset: int = Query(0, ge=0),
        limit: int = Query(20, ge=1, le=MAX_LIMIT),
        q: str | None = Query(None, max_length=200),
        filter: str | None = Query(None, pattern="^(dropped|parse_failures)$"),
        min_margin: float | None = None,
    ) -> dict[str, Any]:
        query = DataQuery(view, offset, limit, q or None, filter, min_margin)
        return _guard(lambda: prompt_page(source.layout(run), t, query))

    @router.get("/api/runs/{run}/iterations/{t}/files/{name}", dependencies=read)
    def file(
        run: str,
        t: int,
        name: str,
        offset: int = Query(0, ge=0),
        limit: int = Query(50, ge=1, le=MAX_LIMIT),
        q: str | None = Query(None, max_length=200),
    ) -> dict[str, Any]:
        return _guard(lambda: file_page(source.layout(run), t, name, offset, limit, q or None))

    @router.get("/api/runs/{run}/iterations/{t}/eval", dependencies=read)
    def evaluation(
        run: str,
        t: int,
        file: str | None = Query(None, max_length=200),
        offset: int = Query(0, ge=0),
        limit: int = Query(20, ge=1, le=MAX_LIMIT),
    ) -> dict[str, Any]:
        return _guard(lambda: eval_page(source.layout(run), t, file, offset, limit))

    return router
