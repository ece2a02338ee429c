"""The one place HTTP clients are built: every client of the project (the OpenAI-compatible
client, Gemini's SDK transport, the judge service's client) gets its httpx.AsyncClient here, so
pool sizes and timeouts follow one rule: a connect timeout of at most 10 s, a read timeout of
`timeout_s`, twice `concurrency` connections with `concurrency` kept alive.

An httpx.AsyncClient belongs to the event loop that first uses it: build it inside the
coroutine that uses it (or lazily, on first use) and close it in that loop.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx

CONNECT_TIMEOUT_S = 10.0


def build_http_client(
    *,
    base_url: str | None = None,
    timeout_s: float,
    concurrency: int,
    headers: Mapping[str, str] | None = None,
) -> httpx.AsyncClient:
    """A pooled async HTTP client (see the module docstring)."""
    concurrency = max(1, concurrency)
    kwargs: dict[str, object] = {}
    if base_url is not None:
        kwargs["base_url"] = base_url
    return httpx.AsyncClient(
        headers=dict(headers or {}),
        timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S)),
        limits=httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency),
        **kwargs,  # type: ignore[arg-type]
    )


def bearer(token: str | None) -> dict[str, str]:
    """The Authorization header of a bearer token (none without a token)."""
    return {"Authorization": f"Bearer {token}"} if token else {}
