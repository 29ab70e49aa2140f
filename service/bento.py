"""The BentoML service: BentoML runs the server (workers, ``/livez``, ``/readyz``, ``/metrics``,
the OpenAPI page) and mounts the project's HTTP API (service/http.py) at the root.

Which models it serves comes from the settings (``BACKBONES_SERVE_MODELS``, set by
``backbones serve --model``); how many worker processes, from :func:`models.runtime.serving_plan`.
A worker starts taking connections once it has tried to load every served model: workers share
the listening socket, so while one is still loading, the others answer. ``/readyz`` is 200 only
when every served model is loaded and warmed up; a model that failed to load is retried in the
background while ``/readyz`` says why it is not ready.
"""

from __future__ import annotations

import logging

import bentoml

from models import get_settings
from models.runtime import serving_plan

from .http import create_app
from .pool import ModelPool

log = logging.getLogger(__name__)

_settings = get_settings()
_pool = ModelPool(_settings.served_refs(), settings=_settings)
app = create_app(_pool)


@bentoml.service(
    name="backbones",
    workers=serving_plan(_settings).workers,
    traffic={"timeout": 60},
    metrics={"enabled": True, "namespace": "bentoml_service"},
    logging={"access": {"enabled": _settings.access_log}},
)
@bentoml.asgi_app(app, path="/")
class Backbones:
    def __init__(self) -> None:
        self.pool = _pool

    @bentoml.on_startup
    async def load_models(self) -> None:
        await self.pool.start()

    @bentoml.on_shutdown
    async def stop(self) -> None:
        await self.pool.close()

    async def __is_ready__(self) -> bool:
        return self.pool.ready
