"""The Open Inference Protocol's routes on the service's FastAPI app (documented in ``/docs.json``,
so the schemathesis run covers them), and :class:`OipRoutes`, the fast path that answers
``POST .../infer`` ahead of BentoML's and FastAPI's routing, as :class:`service.http.ImageRoutes`
does for ``/classify``. The handlers are service/oip.py's.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any

from fastapi import FastAPI, Request
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from .drain import Drain
from .http import TIMEOUT, ApiError, error_responses
from .oip import (
    EXTENSIONS,
    INFER_ERRORS,
    INFER_PATH,
    MODEL_ERRORS,
    SERVER_ERRORS,
    ModelMetadata,
    OpenInference,
    ServerMetadata,
    error,
    model_metadata,
    server_version,
)
from .pool import ModelPool

log = logging.getLogger(__name__)

_TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string", "description": "image (BYTES) or the model's input (FP32)"},
        "datatype": {"type": "string", "enum": ["BYTES", "FP32"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}},
        "data": {"type": "array", "description": "row-major, flat or nested; BYTES elements as base64 strings"},
    },
}
_INFER_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
        "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": _TENSOR},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "enum": ["logits", "features"]},
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "binary_data": {"type": "boolean"},
                            "classification": {"type": "integer", "minimum": 1},
                        },
                    },
                },
            },
        },
    },
}
_INFER_RESPONSE = {
    "type": "object",
    "required": ["model_name", "model_version", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "datatype", "shape"],
                "properties": {
                    "name": {"type": "string"},
                    "datatype": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer"}},
                    "data": {"type": "array"},
                    "parameters": {"type": "object"},
                },
            },
        },
    },
}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
INFER_DOC: dict[str, Any] = {
    "parameters": [
        {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "description": "binary tensor data extension: the length of the JSON header; the tensors follow it",
            "schema": {"type": "integer", "minimum": 0},
        }
    ],
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _INFER_REQUEST}, "application/octet-stream": _BINARY},
    },
}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the outputs; with binary outputs, a JSON header of Inference-Header-Content-Length bytes, "
        "then the tensors",
        "content": {"application/json": {"schema": _INFER_RESPONSE}, "application/octet-stream": _BINARY},
    },
    **error_responses(INFER_ERRORS),
}
EMPTY_200: dict[int | str, dict[str, Any]] = {200: {"description": "true (an empty body)"}}


def add_oip_routes(app: FastAPI, pool: ModelPool, drain: Drain) -> OpenInference:
    """Add the ``/v2`` routes to ``app`` (service.http.create_app's, whose decode pool they share)."""
    oip = app.state.oip = OpenInference(pool, app.state.decode_pool, drain)
    server = ServerMetadata(name="backbones", version=server_version(), extensions=list(EXTENSIONS))
    tags: list[str | Enum] = ["Open Inference Protocol (KServe v2)"]

    @app.get("/v2", tags=tags, responses=error_responses(TIMEOUT), summary="Server metadata and extensions")
    async def server_metadata() -> ServerMetadata:
        return server

    @app.get("/v2/health/live", tags=tags, response_class=Response, responses=EMPTY_200, summary="Liveness")
    async def live() -> Response:
        return Response()

    @app.get(
        "/v2/health/ready",
        tags=tags,
        response_class=Response,
        responses={**EMPTY_200, **error_responses(SERVER_ERRORS)},
        summary="Readiness: every served model loaded, not draining",
    )
    async def ready() -> Response:
        why = oip.not_ready()
        return error(ApiError(503, f"not ready: {why}", {"Retry-After": "5"})) if why else Response()

    model_doc: dict[str, Any] = {"tags": tags, "responses": error_responses(MODEL_ERRORS)}

    @app.get("/v2/models/{model_name}", summary="Model metadata", **model_doc)
    async def metadata(model_name: str) -> ModelMetadata:
        return model_metadata(oip.served(model_name).model.spec)

    @app.get("/v2/models/{model_name}/versions/{model_version}", summary="Model version metadata", **model_doc)
    async def version_metadata(model_name: str, model_version: str) -> ModelMetadata:
        return model_metadata(oip.served(model_name, model_version).model.spec)

    ready_doc: dict[str, Any] = {"tags": tags, "response_class": Response}
    ready_doc["responses"] = {**EMPTY_200, **error_responses(MODEL_ERRORS)}

    @app.get("/v2/models/{model_name}/ready", summary="Model readiness", **ready_doc)
    async def model_ready(model_name: str) -> Response:
        oip.served(model_name)
        return Response()

    @app.get("/v2/models/{model_name}/versions/{model_version}/ready", summary="Model version readiness", **ready_doc)
    async def version_ready(model_name: str, model_version: str) -> Response:
        oip.served(model_name, model_version)
        return Response()

    infer_doc: dict[str, Any] = {
        "tags": tags,
        "response_class": Response,
        "openapi_extra": INFER_DOC,
        "responses": INFER_RESPONSES,
    }

    @app.post("/v2/models/{model_name}/infer", summary="Inference", **infer_doc)
    async def infer(request: Request, model_name: str) -> Response:
        return await oip.infer(request.scope, request.receive, model_name, None)

    @app.post("/v2/models/{model_name}/versions/{model_version}/infer", summary="Inference on a version", **infer_doc)
    async def version_infer(request: Request, model_name: str, model_version: str) -> Response:
        return await oip.infer(request.scope, request.receive, model_name, model_version)

    return oip


class OipRoutes:
    """ASGI middleware answering ``POST /v2/models/{model}[/versions/{version}]/infer`` with the
    handler of ``fastapi_app`` (after :func:`add_oip_routes`) before BentoML's and FastAPI's
    routing; the FastAPI routes stay, for the document, 405s, and the same answers when reached.
    A path under ``/v2`` that no route has (Triton's ``/config``, ``/stats``, ...) gets a JSON 404
    like every other error, where BentoML's router would answer in plain text."""

    def __init__(self, app: ASGIApp, *, fastapi_app: FastAPI) -> None:
        self.app = app
        self.oip: OpenInference = fastapi_app.state.oip
        self.routes = [
            r for r in fastapi_app.routes if isinstance(r, BaseRoute) and getattr(r, "path", "").startswith("/v2")
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v2"):
            await self.app(scope, receive, send)
            return
        match = INFER_PATH.fullmatch(scope["path"]) if scope["method"] == "POST" else None
        if match is None:
            if any(route.matches(scope)[0] != Match.NONE for route in self.routes):
                await self.app(scope, receive, send)
                return
            response: Response = JSONResponse({"error": f"no such route: {scope['path']}"[:300]}, status_code=404)
        else:
            try:
                response = await self.oip.infer(scope, receive, match[1], match[2])
            except ClientDisconnect:  # the client left mid-upload: nobody to answer
                return
            except Exception:  # a bug: logged, and answered as JSON like every other error
                log.exception("%s failed", scope["path"])
                response = JSONResponse({"error": "internal error"}, status_code=500)
        await response(scope, receive, send)
