"""Errors as the API answers them: a status and ``{"error": "..."}``, declared in the OpenAPI document.

Every client mistake is a 4xx raised as :class:`ApiError`; Starlette's and FastAPI's own refusals
(405, a request that fails validation) get the same body through :func:`error_for`. A 500 is
always a bug.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from .public import redact

# The status of each kind of models.ImageError (models/errors.py IMAGE_ERROR_KINDS).
IMAGE_KINDS_TO_STATUS = {"empty": 400, "undecodable": 400, "too_large": 413, "unsupported_format": 415}
RETRY_AFTER_SECONDS = 5  # what a 503 for a model still loading asks the client to wait

# Every status a route can answer besides 200, with the ``{"error": ...}`` body: the OpenAPI document
# declares exactly these, and the schemathesis run (tests/test_api_fuzz.py) holds the service to them.
TIMEOUT = {504: "not answered within request_timeout_seconds"}
UNAUTHORIZED = {401: "a missing or invalid API key (when API keys are configured)"}
IMAGE_ERRORS = {
    400: "undecodable, truncated or empty image, or a malformed multipart body",
    404: "unknown model, or one that is not served here",
    413: "request or image too large",
    415: "not multipart/form-data, or an image format that is not accepted",
    422: "a missing or bad field",
    503: "overloaded or a model not loaded yet (see Retry-After)",
    **TIMEOUT,
}


class Error(BaseModel):
    """The body of every error response."""

    error: str


def error_responses(statuses: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """FastAPI's ``responses=`` declaration of these statuses, each with the :class:`Error` body."""
    return {code: {"model": Error, "description": why} for code, why in statuses.items()}


class ApiError(Exception):
    """A request the service refuses: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error body; the message passes through :func:`service.public.redact` (no paths)."""
    return JSONResponse({"error": redact(message)}, status_code=status, headers=headers)


def body_pending(scope: MutableMapping[str, Any]) -> bool:
    """Whether the request may have a body that an answer given before reading it leaves unread:
    such an answer closes the connection rather than read the rest (tests/test_hostile.py)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return False


def error_for(exc: Exception) -> JSONResponse:
    """The response to an :class:`ApiError`, or to Starlette's or FastAPI's own refusal of a request."""
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.message, exc.headers)
    if isinstance(exc, StarletteHTTPException):
        message = str(exc.detail).lower() if exc.detail else "error"
        return error_response(exc.status_code, message, dict(exc.headers or {}))
    if isinstance(exc, RequestValidationError):
        return error_response(422, f"invalid request: {exc.errors()[:1]}")
    raise TypeError(f"not a refusal of a request: {type(exc).__name__}") from exc


async def _handle(_: Request, exc: Exception) -> JSONResponse:
    return error_for(exc)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every refusal :func:`error_for` knows with its JSON error body."""
    for kind in (ApiError, StarletteHTTPException, RequestValidationError):
        app.add_exception_handler(kind, _handle)
