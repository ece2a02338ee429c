"""The standalone dashboard of `selfreward ui`: the /ui router over an artifact folder, read-only."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from selfreward import __version__
from selfreward.dashboard.router import dashboard_router
from selfreward.dashboard.source import ArtifactSource


def create_app(artifact_root: str | Path) -> FastAPI:
    app = FastAPI(title="selfreward dashboard", version=__version__, docs_url=None, redoc_url=None)
    app.include_router(dashboard_router(ArtifactSource(artifact_root)))

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    return app
