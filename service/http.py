"""The HTTP API: ``POST /classify``, ``POST /embed``, ``GET /models`` (DESIGN.md §5).

Kept thin: parse and validate the request, decode in a thread pool (never inside the batched
model call, so decoding overlaps with inference), hand the tensor to the model's batcher, shape
the response. Every client mistake is a 4xx with ``{"error": ...}``; a 500 is always a bug.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from models import ImageError, top_k
from models.errors import BackbonesError
from models.runtime import serving_plan

from .batching import OverloadedError
from .metrics import metrics
from .multipart import read_plain_form, starlette_parts
from .pool import ModelPool, ServedModel

log = logging.getLogger(__name__)

IMAGE_KINDS_TO_STATUS = {"empty": 400, "undecodable": 400, "too_large": 413, "unsupported_format": 415}
FORM_FIELDS = {"image", "model", "top_k"}
IMAGE_ROUTES = ("/classify", "/embed")  # the routes that take an uploaded image

_MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {
                            "type": "string",
                            "format": "binary",
                            "description": "JPEG, PNG, GIF, WebP, BMP or TIFF",
                        },
                        "model": {
                            "type": "string",
                            "description": "name, name:version or name@alias (default: the first served model)",
                        },
                        "top_k": {"type": "integer", "minimum": 1, "default": 5, "description": "classify only"},
                    },
                }
            }
        },
    },
}

# Every status a route can answer besides 200, with the ``{"error": ...}`` body: the OpenAPI document
# declares exactly these, and the schemathesis run (tests/test_api_fuzz.py) holds the service to them.
TIMEOUT = {504: "not answered within request_timeout_seconds"}
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
    return {code: {"model": Error, "description": why} for code, why in statuses.items()}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def create_app(pool: ModelPool) -> FastAPI:
    settings = pool.settings
    decode_pool = ThreadPoolExecutor(max_workers=serving_plan(settings).decode_threads, thread_name_prefix="decode")
    app = FastAPI(title="backbones", description="Classify images and embed them with ONNX backbones.", version="1")
    app.state.pool = pool
    app.state.decode_pool = decode_pool  # shared with the Open Inference Protocol's routes (service/oip.py)
    m = metrics()

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail).lower() if exc.detail else "error", dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, f"invalid request: {exc.errors()[:1]}")

    async def read_form(scope: Scope, receive: Receive) -> tuple[bytes, str | None, str | None]:
        """The image bytes and the raw ``model`` and ``top_k`` fields, with every limit enforced."""
        headers = Headers(scope=scope)
        ctype = headers.get("content-type", "")
        # a urlencoded form cannot carry a file, but is parsed so that its fields get a precise 422
        if not ctype.lower().startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            raise ApiError(
                415,
                f"expected multipart/form-data with a file field 'image', got {ctype.split(';')[0] or 'no content type'}",
            )
        limit = settings.max_request_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {int(declared):,} bytes exceeds the limit of {limit:,}")
        request = Request(scope, receive)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit:,} bytes")
        parts = read_plain_form(bytes(body), ctype)
        if parts is None:  # not the plain form: Starlette's parser decides, errors included
            request._body = bytes(body)  # let Starlette parse the body already read
            try:
                parts = await starlette_parts(request, max_part_size=limit)
            except Exception as e:  # malformed multipart
                raise ApiError(400, f"malformed multipart body: {e}") from None
        fields = {p.name: p for p in parts}  # a repeated field: the last one counts, as in Starlette
        unknown = set(fields) - FORM_FIELDS
        image = fields.get("image")
        if image is None:
            hint = f" (got fields: {', '.join(sorted(unknown))})" if unknown else ""
            raise ApiError(422, f"missing file field 'image'{hint}")
        if not image.is_file:
            raise ApiError(422, "field 'image' must be an uploaded file, not text (URLs are never fetched)")
        if unknown:
            raise ApiError(422, f"unknown field(s): {', '.join(sorted(unknown))}; accepted: image, model, top_k")
        text: dict[str, str] = {}
        for fname in ("model", "top_k"):
            part = fields.get(fname)
            if part is not None:
                if not isinstance(part.value, str):
                    raise ApiError(422, f"field {fname!r} must be text, not a file")
                text[fname] = part.value
        data = image.value if isinstance(image.value, bytes) else image.value.encode()
        return data, text.get("model"), text.get("top_k")

    def choose(requested: str | None) -> ServedModel:
        try:
            slot = pool.find(requested.strip() if requested else None)
        except BackbonesError as e:
            raise ApiError(404, f"unknown model {requested!r}: {e}") from None
        if slot is None:
            served = ", ".join(s.ref for s in pool.slots)
            raise ApiError(404, f"model {requested!r} is not served here; served: {served}")
        if slot.current is None:
            raise ApiError(503, f"model {slot.ref} is not loaded yet: {slot.error or 'loading'}", {"Retry-After": "5"})
        return slot.current

    def parse_top_k(raw: str | None, num_classes: int) -> int:
        if raw is None or raw.strip() == "":
            return min(5, num_classes)
        try:
            k = int(raw.strip())
        except ValueError:
            raise ApiError(422, f"top_k must be an integer, got {raw[:40]!r}") from None
        if not 1 <= k <= num_classes:
            raise ApiError(422, f"top_k must be between 1 and {num_classes} (the model's classes), got {k}")
        return k

    async def run(scope: Scope, receive: Receive, endpoint: str) -> tuple[ServedModel, np.ndarray, np.ndarray, int]:
        data, model_field, k_field = await read_form(scope, receive)
        served = choose(model_field)
        name = served.model.spec.name
        k = parse_top_k(k_field, served.model.spec.num_classes) if endpoint == "classify" else 0
        try:
            served.batcher.admit()
        except OverloadedError as e:
            raise ApiError(
                503, "overloaded: too many requests in flight", {"Retry-After": str(int(e.retry_after))}
            ) from None
        m.inflight.labels(name).inc()
        try:
            start = time.perf_counter()
            try:
                array = await asyncio.get_running_loop().run_in_executor(decode_pool, served.model.loader, data)
            except ImageError as e:
                raise ApiError(IMAGE_KINDS_TO_STATUS.get(e.kind, 400), str(e)) from None
            m.decode_seconds.labels(name).observe(time.perf_counter() - start)
            logits, features = await served.batcher.infer(array)
        finally:
            served.batcher.release()
            m.inflight.labels(name).dec()
        return served, logits, features, k

    def count(endpoint: str, served: ServedModel | None, outcome: str) -> None:
        spec = served.model.spec if served else None
        m.requests.labels(endpoint, spec.name if spec else "", spec.version if spec else "", outcome, "backbones").inc()

    async def handle(scope: Scope, receive: Receive, endpoint: str) -> JSONResponse:
        """The response to an image request; client mistakes raise :class:`ApiError`."""
        try:
            served, logits, features, k = await run(scope, receive, endpoint)
        except ApiError as e:
            count(endpoint, None, "overloaded" if e.status == 503 else "client_error")
            raise
        except Exception:
            count(endpoint, None, "error")
            raise
        spec = served.model.spec
        count(endpoint, served, "ok")
        if endpoint == "embed":
            return JSONResponse({"model": spec.tag, "dim": int(features.shape[0]), "embedding": features.tolist()})
        preds = top_k(logits, spec.labels, k)[0]
        m.top1_confidence.labels(spec.name, spec.version).observe(preds[0].score)
        return JSONResponse({"model": spec.tag, "predictions": [p.to_dict() for p in preds]})

    @app.post(
        "/classify",
        openapi_extra=_MULTIPART_BODY,
        responses=error_responses(IMAGE_ERRORS),
        summary="Top-k ImageNet (or fine-tuned) classes of an image",
    )
    async def classify(request: Request) -> JSONResponse:
        return await handle(request.scope, request.receive, "classify")

    @app.post(
        "/embed",
        openapi_extra=_MULTIPART_BODY,
        responses=error_responses(IMAGE_ERRORS),
        summary="The feature vector of an image",
    )
    async def embed(request: Request) -> JSONResponse:
        return await handle(request.scope, request.receive, "embed")

    @app.get(
        "/models", responses=error_responses(TIMEOUT), summary="Served models with their versions, aliases and specs"
    )
    async def list_models() -> dict[str, Any]:
        return {"ready": pool.ready, "models": [s.describe(pool.registry) for s in pool.slots]}

    app.state.image_handler = handle
    return app


class ImageRoutes:
    """ASGI middleware answering ``POST /classify`` and ``POST /embed`` with the app's own handler,
    before the request enters the routing and middleware of BentoML's and FastAPI's apps.

    The FastAPI routes stay: they document the API (``/docs.json``), answer other methods with 405,
    and answer the same way when reached. This path only skips layers. Per-thread CPU accounting
    at 64 clients on the 2-core machine showed the event loop taking as much time per request as
    the model's whole decode, and most of that time went to those layers."""

    def __init__(self, app: ASGIApp, *, fastapi_app: FastAPI, routes: tuple[str, ...] = IMAGE_ROUTES) -> None:
        self.app = app
        self.handler = fastapi_app.state.image_handler
        self.routes = {route: route.strip("/") for route in routes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        try:
            response = await self.handler(scope, receive, endpoint)
        except ApiError as e:
            response = JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)
        except ClientDisconnect:  # the client left mid-upload: nobody to answer
            return
        except Exception:  # a bug: logged, and answered as JSON like every other error
            log.exception("%s failed", scope["path"])
            response = JSONResponse({"error": "internal error"}, status_code=500)
        await response(scope, receive, send)
