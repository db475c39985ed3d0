"""Authentication: API keys (``X-API-Key`` or ``Authorization: Bearer <key>``) and short-lived bearer tokens.

Auth is on by default; ``auth_enabled: false`` turns it off for local use. Keys are compared with
``secrets.compare_digest`` against every configured key, so timing does not reveal which prefix matched. Tokens come
from ``POST /auth/token`` (the MONAI Label flow, username + password from the settings) and live in memory.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from server.errors import ApiError
from server.settings import Settings


@dataclass
class TokenStore:
    """Issued bearer tokens → (user, expiry)."""

    ttl_s: int
    _tokens: dict[str, tuple[str, float]] = field(default_factory=dict)

    def issue(self, user: str) -> str:
        token = secrets.token_urlsafe(32)
        self._tokens[token] = (user, time.time() + self.ttl_s)
        return token

    def valid(self, token: str) -> bool:
        now = time.time()
        self._tokens = {t: v for t, v in self._tokens.items() if v[1] > now}
        return any(secrets.compare_digest(token.encode(), t.encode()) for t in self._tokens)


def check_password(settings: Settings, username: str, password: str) -> bool:
    """Constant-time check of a username/password pair from the settings."""
    ok = False
    for user, secret in settings.users.items():
        ok |= secrets.compare_digest(user.encode(), username.encode()) & secrets.compare_digest(
            secret.get_secret_value().encode(), password.encode()
        )
    return ok


def _presented_credential(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    return None


# Declared so that the OpenAPI document names both ways of authenticating (clients and schema-driven tools read it);
# the credential itself is read from the headers below, in one place, whichever way it came.
_API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key from the server settings")
_BEARER = HTTPBearer(auto_error=False, description="an API key, or a token from POST /auth/token")


async def require_auth(
    request: Request,
    _key: str | None = Security(_API_KEY),
    _bearer: HTTPAuthorizationCredentials | None = Security(_BEARER),
) -> None:
    """FastAPI dependency: 401 unless auth is disabled or a valid key / token is presented."""
    settings: Settings = request.app.state.settings
    if not settings.auth_enabled:
        return
    credential = _presented_credential(request)
    if credential is not None:
        match = False
        for key in settings.api_keys:
            match |= secrets.compare_digest(key.get_secret_value().encode(), credential.encode())
        if match or request.app.state.tokens.valid(credential):
            return
    raise ApiError(
        401,
        "Unauthorized",
        "missing or invalid credentials",
        hint="send `X-API-Key: <key>` or `Authorization: Bearer <key or token>`",
        headers={"WWW-Authenticate": "Bearer"},
    )
