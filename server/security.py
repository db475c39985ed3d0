"""Authentication: API keys (``X-API-Key`` or ``Authorization: Bearer <key>``) and short-lived bearer tokens.

Auth is on by default; ``auth_enabled: false`` turns it off for local use. Keys are compared with
``secrets.compare_digest`` against every configured key, so timing does not reveal which prefix matched. Tokens come
from ``POST /auth/token`` (the MONAI Label flow, username + password from the settings): HS256 JSON Web Tokens
signed with ``settings.token_secret`` and expiring after ``token_ttl_s``, so every replica holding the same secret
accepts a token any of them issued, and no replica keeps token state. Without a configured secret (the
single-machine default) a random key is made at start-up: tokens then die with the process.
"""

from __future__ import annotations

import logging
import secrets
import time

import jwt
from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from server.errors import ApiError
from server.settings import Settings

logger = logging.getLogger("server")

ISSUER = "medseg"
ALGORITHM = "HS256"
#: Tolerated clock difference between the replica that issued a token and the one checking it.
LEEWAY_S = 10


class TokenSigner:
    """Issues and checks bearer tokens: HS256 JWTs with ``sub`` (user), ``iat``, ``exp`` and ``iss`` claims.

    Args:
        secret: the signing key (at least 32 bytes).
        ttl_s: token lifetime in seconds.
    """

    def __init__(self, secret: bytes, ttl_s: int) -> None:
        if len(secret) < 32:
            raise ValueError(f"the token key must have at least 32 bytes, got {len(secret)}")
        self._secret = secret
        self.ttl_s = ttl_s

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenSigner:
        """The key of ``settings.token_secret``, or a random one for this process when none is configured."""
        if settings.token_secret is None:
            if settings.auth_enabled:
                logger.info("no token_secret configured: bearer tokens are valid on this server process only")
            return cls(secrets.token_bytes(32), settings.token_ttl_s)
        return cls(settings.token_secret.get_secret_value().encode(), settings.token_ttl_s)

    def issue(self, user: str) -> str:
        now = int(time.time())
        claims = {"sub": user, "iat": now, "exp": now + self.ttl_s, "iss": ISSUER}
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def user(self, token: str) -> str | None:
        """The user a valid token was issued to; None for a forged, altered, expired or foreign token."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],  # only HS256: an "alg: none" or RS256-confusion token is refused
                issuer=ISSUER,
                leeway=LEEWAY_S,
                options={"require": ["sub", "iat", "exp", "iss"]},
            )
        except jwt.PyJWTError:
            return None
        user = claims.get("sub")
        return user if isinstance(user, str) else None

    def valid(self, token: str) -> bool:
        return self.user(token) is not None


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
        if match:
            return
        user = request.app.state.tokens.user(credential)
        if user is not None and user in settings.users:  # a user removed from the settings loses their tokens
            return
    raise ApiError(
        401,
        "Unauthorized",
        "missing or invalid credentials",
        hint="send `X-API-Key: <key>` or `Authorization: Bearer <key or token>`",
        headers={"WWW-Authenticate": "Bearer"},
    )
