"""One bearer check for both HTTP APIs (selfreward.api.auth): constant time, same rules."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from selfreward.api import auth

TOKEN = "s3cret-token"


def apps(redis_url: str) -> dict[str, tuple[Any, str, dict[str, Any]]]:
    from selfreward.api.coordinator.app import create_app as coordinator
    from selfreward.api.judge.app import create_app as judge
    from selfreward.api.judge.settings import JudgeSettings

    return {
        # a body the route refuses after the auth check (422), so nothing is created
        "coordinator": (coordinator(redis_url=redis_url, api_token=TOKEN, environ={}), "/runs", {"nope": 1}),
        "judge": (judge(JudgeSettings(api_token=TOKEN)), "/v1/score", {"instruction": "x", "responses": []}),
    }


@pytest.mark.parametrize("name", ["coordinator", "judge"])
def test_mutating_routes_need_the_token(name: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[bytes] = []
    real = auth.secrets.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return real(a, b)

    monkeypatch.setattr(auth.secrets, "compare_digest", spy)
    app, route, body = apps(redis_url)[name]
    with TestClient(app) as client:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
            r = client.post(route, json=body, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (headers, r.text)
        for scheme in ("Bearer", "bearer"):
            r = client.post(route, json=body, headers={"Authorization": f"{scheme} {TOKEN}"})
            assert r.status_code == 422, r.text  # past the check
        assert client.get("/healthz").status_code in (200, 503)  # read-only routes stay open
        assert "HTTPBearer" in client.get("/openapi.json").json()["components"]["securitySchemes"]
    assert compared and set(compared) == {b"nope", TOKEN.encode()}  # compared in constant time


def test_no_token_configured_means_open() -> None:
    from selfreward.api.judge.app import create_app
    from selfreward.api.judge.settings import JudgeSettings

    with TestClient(create_app(JudgeSettings(api_token=None))) as client:
        r = client.post("/v1/score", json={"instruction": "x", "responses": []})
        assert r.status_code == 422
