"""Optional bearer-key authentication: off unless keys are configured.

Keys come from ``api_keys`` (comma-separated) and from ``api_keys_file`` (SHA-256 hex digests, one
per line), both read once at start-up. Only digests are kept in memory; a presented key is hashed
and compared with every digest in constant time (``hmac.compare_digest``), so the time taken says
nothing about how much of a key was right. A request to any path but ``auth_open_paths`` without
``Authorization: Bearer <key>`` (or with a wrong key) gets 401 with a JSON error and
``WWW-Authenticate``. Keys are never logged, and never part of an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from models import BackbonesError, Settings

from .drain import ASGIApp, Receive, Scope, Send
from .errors import body_pending, error_response

MIN_KEY_LENGTH = 16  # a shorter key could be guessed; `secrets.token_urlsafe(32)` makes a good one
REALM = 'Bearer realm="backbones"'
_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


def key_digest(key: str) -> bytes:
    """The SHA-256 digest of a key, as ``api_keys_file`` holds it (in hex)."""
    return hashlib.sha256(key.encode()).digest()


def _file_digests(settings: Settings) -> list[bytes]:
    path = settings.api_keys_file
    if path is None:
        return []
    env = Settings.env_name("api_keys_file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BackbonesError(
            f"{env}: cannot read the API key file {path}: {getattr(e, 'strerror', None) or e}"
        ) from None
    digests = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not _DIGEST.fullmatch(line):
            raise BackbonesError(
                f"{env}: line {number} of {path} is not a SHA-256 hex digest (64 hex digits); "
                "make one with: printf %s KEY | sha256sum"
            )
        digests.append(bytes.fromhex(line))
    if not digests:  # an empty file must not turn authentication off
        raise BackbonesError(f"{env}: {path} holds no key digest")
    return digests


def load_key_digests(settings: Settings) -> tuple[bytes, ...]:
    """The digests of every configured key; empty when authentication is off. A key shorter than
    :data:`MIN_KEY_LENGTH` or a malformed key file is an error naming the setting (not the key)."""
    keys = [k.strip() for k in settings.api_keys.get_secret_value().split(",") if k.strip()]
    short = sum(len(k) < MIN_KEY_LENGTH for k in keys)
    if short:
        raise BackbonesError(
            f"{Settings.env_name('api_keys')}: {short} key(s) shorter than {MIN_KEY_LENGTH} characters; "
            "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return tuple(dict.fromkeys([*(key_digest(k) for k in keys), *_file_digests(settings)]))


def bearer_token(scope: Scope) -> str | None:
    """The token of the request's ``Authorization: Bearer`` header, if it has one."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def accepts(digests: tuple[bytes, ...], token: str) -> bool:
    """Whether ``token`` is one of the keys: compared with every digest, in constant time."""
    presented = key_digest(token)
    found = False
    for digest in digests:
        found |= hmac.compare_digest(presented, digest)
    return found


class AuthMiddleware:
    """401 for a request without a valid key, on every path but the open ones; nothing at all when
    no key is configured."""

    def __init__(self, app: ASGIApp, *, digests: tuple[bytes, ...], open_paths: frozenset[str]) -> None:
        self.app = app
        self.digests = digests
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.digests or scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is not None and accepts(self.digests, token):
            await self.app(scope, receive, send)
            return
        if token is None:
            message, challenge = "authentication required: send the header 'Authorization: Bearer <API key>'", REALM
        else:
            message, challenge = "invalid API key", f'{REALM}, error="invalid_token"'
        headers = {"WWW-Authenticate": challenge}
        if body_pending(scope):
            headers["Connection"] = "close"
        await error_response(401, message, headers)(scope, receive, send)
