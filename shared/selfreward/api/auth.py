"""Bearer-token auth of the HTTP APIs (coordinator, judge service): one check, constant time.

`require_token(token)` is a FastAPI dependency: with a token configured, a request must carry
`Authorization: Bearer <token>` (scheme case-insensitive), compared with `secrets.compare_digest`
so the answer time says nothing about how much of a guess was right; without one (None or
empty), every request passes. A refusal is 401 with `WWW-Authenticate: Bearer`. The OpenAPI
document of both APIs declares the bearer scheme.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

_BEARER = HTTPBearer(auto_error=False)


def token_matches(credentials: HTTPAuthorizationCredentials | None, token: str) -> bool:
    if credentials is None or credentials.scheme.lower() != "bearer":
        return False
    return secrets.compare_digest(credentials.credentials.encode(), token.encode())


def require_token(token: str | None) -> Callable[..., None]:
    """The dependency enforcing `token` (see the module docstring)."""

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(_BEARER)) -> None:
        if token and not token_matches(credentials, token):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return check
