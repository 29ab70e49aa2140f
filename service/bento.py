"""The BentoML service: BentoML runs the server (workers, ``/livez``, ``/readyz``, ``/metrics``,
the OpenAPI page) and mounts the project's HTTP API (service/http.py, and the Open Inference
Protocol's routes, service/oip_routes.py) at the root.

Which models it serves comes from the settings (``BACKBONES_SERVE_MODELS``, set by
``backbones serve --model``); how many worker processes, from :func:`models.runtime.serving_plan`.
A worker starts taking connections once it has tried to load every served model: workers share
the listening socket, so while one is still loading, the others answer. ``/readyz`` is 200 only
when every served model is loaded and warmed up; a model that failed to load is retried in the
background while ``/readyz`` says why it is not ready (JSON, service/drain.py). SIGTERM drains a
worker (service/drain.py); a request not answered within ``request_timeout_seconds`` gets 504
(BentoML's traffic timeout, which answers ``{"error": ...}``).

Hostile traffic: connections and request heads are bounded below the app (service/transport.py),
image requests are admitted before their bodies are read (service/limits.py), keys are checked
when configured (service/auth.py), metric labels stay bounded (service/paths.py), and what the
service says about itself carries no paths (service/public.py).
"""

from __future__ import annotations

import logging
from typing import Any

import bentoml
from bentoml._internal.context import server_context

from models import Settings, get_settings
from models.runtime import serving_plan

from . import transport
from .auth import AuthMiddleware, load_key_digests
from .drain import Drain, ReadinessMiddleware
from .http import IMAGE_ROUTES, ImageRoutes, create_app
from .oip import INFER_URL
from .oip_routes import OipRoutes, add_oip_routes
from .openapi import OpenAPIMiddleware
from .paths import NotFound, RestorePaths
from .pool import ModelPool

log = logging.getLogger(__name__)


def tracing_config(settings: Settings) -> dict[str, Any]:
    """BentoML's per-service tracing settings: the image and infer routes left out unless ``trace_requests``."""
    if settings.trace_requests:
        return {}
    return {"excluded_urls": [*(rf"{route}(\?|$)" for route in IMAGE_ROUTES), INFER_URL]}


_settings = get_settings()
_pool = ModelPool(_settings.served_refs(), settings=_settings)
_drain = Drain(delay_seconds=_settings.drain_delay_seconds, drain_seconds=_settings.drain_seconds)
_digests = load_key_digests(_settings)  # `backbones serve` has already refused a bad key setting
app = create_app(_pool)
add_oip_routes(app, _pool, _drain)  # the Open Inference Protocol (KServe v2) beside the project's routes


@bentoml.service(
    name="backbones",
    workers=serving_plan(_settings).workers,
    traffic={"timeout": _settings.request_timeout_seconds},
    metrics={"enabled": True, "namespace": "bentoml_service"},
    logging={"access": {"enabled": _settings.access_log}},
    tracing=tracing_config(_settings),
)
@bentoml.asgi_app(app, path="/")
class Backbones:
    def __init__(self) -> None:
        self.pool = _pool

    @bentoml.on_startup
    async def load_models(self) -> None:
        _drain.install()  # uvicorn's signal handlers are in place by now: take SIGTERM over
        transport.install(_settings, server_context.worker_index)  # uvicorn opens its listener after this hook
        if _digests:
            log.info("API keys required (%d configured) on every path but %s", len(_digests), _settings.auth_open_paths)
        await self.pool.start()

    @bentoml.on_shutdown
    async def stop(self) -> None:
        transport.uninstall()
        await self.pool.close()

    async def __is_ready__(self) -> bool:
        return self.pool.ready


# the decorators made Backbones a bentoml.Service, which mypy cannot see
# (the first added is the outermost; BentoML's own middlewares, metrics first, run before these)
_service: Any = Backbones
_service.add_asgi_middleware(RestorePaths)
_service.add_asgi_middleware(AuthMiddleware, digests=_digests, open_paths=_settings.open_paths())
_service.add_asgi_middleware(NotFound)
_service.add_asgi_middleware(ReadinessMiddleware, pool=_pool, drain=_drain)
_service.add_asgi_middleware(
    OpenAPIMiddleware, document=lambda: _service.openapi_spec.asdict(), open_paths=_settings.open_paths()
)
_service.add_asgi_middleware(ImageRoutes, fastapi_app=app)
_service.add_asgi_middleware(OipRoutes, fastapi_app=app)
