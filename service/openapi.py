"""The OpenAPI document at ``/docs.json``: BentoML's, completed with the responses BentoML leaves out.

BentoML builds the document from its own probes (declared 200 only) and the mounted FastAPI app's
routes. What the service really answers besides: ``/readyz`` 503 with a JSON reason
(service/drain.py), 504 from BentoML's traffic timeout on any route, and 401 without a valid API
key (service/auth.py) on any route that is not open. Clients and the
schemathesis run (tests/test_api_fuzz.py) rely on every status being declared.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .drain import ASGIApp, Receive, Scope, Send
from .errors import TIMEOUT, UNAUTHORIZED

READINESS_SCHEMA = {
    "type": "object",
    "required": ["ready", "reason"],
    "properties": {
        "ready": {"type": "boolean"},
        "reason": {"type": "string", "description": "draining, or models not loaded"},
        "models": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "each model that is not loaded, with its last load error",
        },
    },
}


def complete(doc: dict[str, Any], open_paths: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``doc`` (BentoML's document, as a dict) with /readyz's 503, a 504 on every operation, and a
    401 on every operation but those of ``open_paths`` (answered when API keys are configured)."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("Error", {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}})
    schemas["Readiness"] = READINESS_SCHEMA
    error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, item in doc.get("paths", {}).items():
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            for code, why in (TIMEOUT | ({} if path in open_paths else UNAUTHORIZED)).items():
                responses.setdefault(str(code), {"description": why, "content": error_ref})
            if path == "/readyz":
                responses["503"] = {
                    "description": "not ready: draining after SIGTERM, or a model not loaded (with the reason)",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}},
                }
    return doc


class OpenAPIMiddleware:
    """Answers ``GET /docs.json`` with :func:`complete` applied to ``document()`` (built once)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        document: Callable[[], dict[str, Any]],
        open_paths: frozenset[str] = frozenset(),
        path: str = "/docs.json",
    ) -> None:
        self.app = app
        self.document = document
        self.open_paths = open_paths
        self.path = path
        self._body: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        if self._body is None:
            self._body = json.dumps(complete(self.document(), self.open_paths)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self._body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self._body if scope["method"] == "GET" else b""})
