"""The HTTP API: ``POST /classify``, ``POST /embed``, ``GET /models`` (DESIGN.md §5).

Kept thin: admit the request before reading its body (service/limits.py), read the form
(service/form.py), choose the served model, decode in a thread pool (never
inside the batched model call, so decoding overlaps with inference), hand the tensor to the model's
batcher, shape the response. Every client mistake is a 4xx with ``{"error": ...}``
(service/errors.py); a 500 is always a bug.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from models import ImageError, top_k
from models.errors import BackbonesError
from models.inference import DEFAULT_TOP_K
from models.runtime import serving_plan
from models.spec import VersionSpec

from .batching import OverloadedError
from .errors import (
    IMAGE_ERRORS,
    IMAGE_KINDS_TO_STATUS,
    RETRY_AFTER_SECONDS,
    TIMEOUT,
    ApiError,
    body_pending,
    error_for,
    error_response,
    error_responses,
    install_error_handlers,
)
from .form import OPENAPI_BODY, Head, ImageForm, image_form, parse_parts, read_body, read_head
from .limits import Admission, Reservation
from .metrics import metrics
from .pool import ModelPool, ServedModel

log = logging.getLogger(__name__)

# The image endpoints: each is the route "/<name>" and the ``endpoint`` label of the metrics.
CLASSIFY, EMBED = "classify", "embed"
IMAGE_ROUTES = (f"/{CLASSIFY}", f"/{EMBED}")


def choose_model(pool: ModelPool, requested: str | None) -> ServedModel:
    """The loaded version a request's ``model`` field names (None: the first served model); 404 for
    a model not served here, 503 for one not loaded yet."""
    try:
        slot = pool.find(requested.strip() if requested else None)
    except BackbonesError as e:
        raise ApiError(404, f"unknown model {requested!r}: {e}") from None
    if slot is None:
        served = ", ".join(s.ref for s in pool.slots)
        raise ApiError(404, f"model {requested!r} is not served here; served: {served}")
    if slot.current is None:
        raise ApiError(
            503,
            f"model {slot.ref} is not loaded yet: {slot.error or 'loading'}",
            {"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    return slot.current


def parse_top_k(raw: str | None, num_classes: int) -> int:
    """The ``top_k`` field as a number of classes (absent or empty: the default, at most every class)."""
    if raw is None or raw.strip() == "":
        return min(DEFAULT_TOP_K, num_classes)
    try:
        k = int(raw.strip())
    except ValueError:
        raise ApiError(422, f"top_k must be an integer, got {raw[:40]!r}") from None
    if not 1 <= k <= num_classes:
        raise ApiError(422, f"top_k must be between 1 and {num_classes} (the model's classes), got {k}")
    return k


def response_body(endpoint: str, spec: VersionSpec, logits: np.ndarray, features: np.ndarray, k: int) -> dict[str, Any]:
    """The JSON an image endpoint answers with for one image's outputs."""
    if endpoint == EMBED:
        return {"model": spec.tag, "dim": int(features.shape[0]), "embedding": features.tolist()}
    return {"model": spec.tag, "predictions": [p.to_dict() for p in top_k(logits, spec.labels, k)[0]]}


def outcome_of(error: BaseException) -> str:
    """The ``outcome`` label of a request that failed with ``error``: a client that left (or a
    request cut by the timeout or a shutdown) is ``cancelled``, never a server ``error``."""
    if isinstance(error, ApiError):
        if error.status == 503:
            return "overloaded"
        return "client_error" if error.status < 500 else "error"
    if isinstance(error, ClientDisconnect | asyncio.CancelledError):
        return "cancelled"
    return "error"


class NonFiniteOutputError(ApiError):
    """A model's output held NaN or Inf: a 500 that names the model, counted against it."""

    def __init__(self, spec: VersionSpec) -> None:
        super().__init__(500, f"model {spec.tag} produced a non-finite output (NaN or Inf) for this image")
        self.spec = spec


def check_finite(served: ServedModel, output: np.ndarray) -> None:
    """Raise :class:`NonFiniteOutputError` when ``output`` holds NaN or Inf (a broken model, or one
    that overflows in its precision): never a body with ``NaN`` in it, never a silent wrong answer."""
    if not np.isfinite(output).all():
        log.error("%s produced NaN or Inf for an image (answered 500)", served.model.spec.tag)
        raise NonFiniteOutputError(served.model.spec)


class ImageHandler:
    """Answers an image request: read the form, choose the model, take a place in its batcher,
    decode in a thread pool, infer, count; client mistakes raise :class:`ApiError`."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool
        self.limit = pool.settings.max_request_bytes
        self.admission = Admission(
            max_requests=pool.settings.queue_limit * len(pool.slots),
            budget_bytes=pool.settings.receive_budget_bytes,
        )
        threads = serving_plan(pool.settings).decode_threads
        self.decode_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self.metrics = metrics()

    async def __call__(self, scope: Scope, receive: Receive, endpoint: str) -> JSONResponse:
        try:
            served, logits, features, k = await self._infer(scope, receive, endpoint)
        except (Exception, asyncio.CancelledError) as e:
            self._count(endpoint, getattr(e, "spec", None), outcome_of(e))
            raise
        spec = served.model.spec
        self._count(endpoint, spec, "ok")
        body = response_body(endpoint, spec, logits, features, k)
        if endpoint == CLASSIFY:
            self.metrics.top1_confidence.labels(spec.name, spec.version).observe(body["predictions"][0]["score"])
        return JSONResponse(body)

    async def _read(self, scope: Scope, receive: Receive, reservation: Reservation, head: Head) -> ImageForm:
        """The request's form; the body is dropped once parsed (the form holds the image's one copy)."""
        try:
            body, ctype = await read_body(scope, receive, self.limit, reservation, head)
        except ApiError as e:
            if body_pending(scope):  # refused before the end of the body: close rather than read the rest
                e.headers["Connection"] = "close"
            raise
        return image_form(await parse_parts(scope, body, ctype, self.limit))

    async def _infer(
        self, scope: Scope, receive: Receive, endpoint: str
    ) -> tuple[ServedModel, np.ndarray, np.ndarray, int]:
        try:  # admission before a byte of the body is read (service/limits.py)
            head = read_head(scope, self.limit)
            reservation = self.admission.admit(head.declared)
        except ApiError as e:
            if body_pending(scope):
                e.headers["Connection"] = "close"
            raise
        try:
            form = await self._read(scope, receive, reservation, head)
            served = choose_model(self.pool, form.model)
            k = parse_top_k(form.top_k, served.model.spec.num_classes) if endpoint == CLASSIFY else 0
            try:
                served.batcher.admit()
            except OverloadedError as e:
                raise ApiError(
                    503, "overloaded: too many requests in flight", {"Retry-After": str(int(e.retry_after))}
                ) from None
            name = served.model.spec.name
            self.metrics.inflight.labels(name).inc()
            try:
                array = await self._decode(served, form.image)
                logits, features = await served.batcher.infer(array)
            finally:
                served.batcher.release()
                self.metrics.inflight.labels(name).dec()
        finally:
            reservation.release()
        check_finite(served, features if endpoint == EMBED else logits)
        return served, logits, features, k

    async def _decode(self, served: ServedModel, data: bytes) -> np.ndarray:
        start = time.perf_counter()
        try:
            array = await asyncio.get_running_loop().run_in_executor(self.decode_pool, served.model.loader, data)
        except ImageError as e:
            raise ApiError(IMAGE_KINDS_TO_STATUS.get(e.kind, 400), str(e)) from None
        self.metrics.decode_seconds.labels(served.model.spec.name).observe(time.perf_counter() - start)
        return array

    def _count(self, endpoint: str, spec: VersionSpec | None, outcome: str) -> None:
        labels = (spec.name, spec.version) if spec else ("", "")
        self.metrics.requests.labels(endpoint, *labels, outcome, "backbones").inc()


# -- the FastAPI app: the routes as the OpenAPI document declares them -----------------------------


async def classify(request: Request) -> JSONResponse:
    return await request.app.state.image_handler(request.scope, request.receive, CLASSIFY)


async def embed(request: Request) -> JSONResponse:
    return await request.app.state.image_handler(request.scope, request.receive, EMBED)


async def list_models(request: Request) -> dict[str, Any]:
    return request.app.state.pool.describe()


def create_app(pool: ModelPool) -> FastAPI:
    app = FastAPI(title="backbones", description="Classify images and embed them with ONNX backbones.", version="1")
    app.state.pool = pool
    app.state.image_handler = ImageHandler(pool)
    # the Open Inference Protocol's routes (service/oip.py) decode in the same threads
    app.state.decode_pool = app.state.image_handler.decode_pool
    install_error_handlers(app)
    for route, endpoint, summary in (
        (f"/{CLASSIFY}", classify, "Top-k ImageNet (or fine-tuned) classes of an image"),
        (f"/{EMBED}", embed, "The feature vector of an image"),
    ):
        app.add_api_route(
            route,
            endpoint,
            methods=["POST"],
            openapi_extra=OPENAPI_BODY,
            responses=error_responses(IMAGE_ERRORS),
            summary=summary,
        )
    app.add_api_route(
        "/models",
        list_models,
        methods=["GET"],
        responses=error_responses(TIMEOUT),
        summary="Served models with their versions, aliases and specs",
    )
    return app


class ImageRoutes:
    """ASGI middleware answering ``POST /classify`` and ``POST /embed`` with the app's own handler,
    before the request enters the routing and middleware of BentoML's and FastAPI's apps.

    The FastAPI routes stay: they document the API (``/docs.json``), answer other methods with 405,
    and answer the same way when reached. This path only skips layers: measured per thread under
    many clients, those layers cost the event loop about as much CPU per request as decoding the
    image (docs/benchmarks.md)."""

    def __init__(self, app: ASGIApp, *, fastapi_app: FastAPI, routes: tuple[str, ...] = IMAGE_ROUTES) -> None:
        self.app = app
        self.handler: ImageHandler = fastapi_app.state.image_handler
        self.routes = {route: route.strip("/") for route in routes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        try:
            response = await self.handler(scope, receive, endpoint)
        except ApiError as e:
            response = error_for(e)
        except ClientDisconnect:  # the client left mid-upload: nobody to answer
            return
        except Exception:  # a bug: logged, and answered as JSON like every other error
            log.exception("%s failed", scope["path"])
            response = error_response(500, "internal error")
        await response(scope, receive, send)
