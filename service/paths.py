"""Bounded path labels for BentoML's request metrics, and a JSON 404 for paths no route serves.

BentoML's HTTP metrics label every request with its raw path, so a scanner requesting
``/nope1``, ``/nope2`` ... would add a series per path to ``/metrics`` without end. BentoML's
metrics middleware is the outermost layer of its app, so the labels are fixed in front of it:
:class:`RouteLabels` (installed around the whole app by service/transport.py) replaces the path
of a request with the template of the route that will serve it (``/v2/models/{name}/infer``), or
with :data:`UNMATCHED` when none will; :class:`RestorePaths`, the first of the service's own
middlewares, puts the real path back before anything routes on it. Routing is Starlette's own:
the route that matches here is the one that answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

from starlette.routing import BaseRoute, Match, Mount

from .drain import ASGIApp, Receive, Scope, Send
from .errors import error_response

UNMATCHED = "/(unmatched)"  # the one label of every path that no route serves
REAL_PATH = "backbones.real_path"  # where the real path waits in the scope while the label stands in
LABEL_CACHE = 1024  # labels of recent paths kept


def route_label(routes: Sequence[BaseRoute], scope: Scope) -> str | None:
    """The template of the route Starlette would choose for ``scope`` (the first full match, else
    the first partial one: a known path with another method), or None."""
    partial: str | None = None
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.NONE:
            continue
        label: str | None = getattr(route, "path", None)
        if label is None:
            continue
        if isinstance(route, Mount) and route.routes:
            inner = route_label(route.routes, {**scope, **child})
            if inner is None:
                continue
            label += inner
        if match == Match.FULL:
            return label or "/"
        partial = partial or label or "/"
    return partial


def static_paths(routes: Iterable[BaseRoute], prefix: str = "") -> set[str]:
    """The paths of routes without parameters: those are their own labels."""
    found: set[str] = set()
    for route in routes:
        path = getattr(route, "path", None)
        if path is None:
            continue
        if isinstance(route, Mount):
            found |= static_paths(route.routes, prefix + path)
        elif "{" not in path:
            found.add(prefix + path or "/")
    return found


class RouteLabels:
    """Outermost ASGI layer: a request's path becomes its route's template (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.routes = routes
        self.static = frozenset(static_paths(routes))
        # routes with parameters (/v2/models/{name}/infer) are hot too: their labels are cached,
        # in a bounded cache (a scan only evicts)
        self._cached = lru_cache(maxsize=LABEL_CACHE)(self._label)

    def label(self, scope: Scope) -> str:
        return self._cached(scope["path"], scope["method"], scope.get("root_path", ""))

    def _label(self, path: str, method: str, root_path: str) -> str:
        scope = {"type": "http", "path": path, "method": method, "root_path": root_path}
        found = route_label(self.routes, scope)
        other = path.rstrip("/") if path.endswith("/") else path + "/"
        if found is None and other:  # Starlette redirects /models/ to /models (as here): label it so
            found = route_label(self.routes, {**scope, "path": other})
        return found or UNMATCHED

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.static:
            label = self.label(scope)
            if label != scope["path"]:
                scope[REAL_PATH], scope["path"] = scope["path"], label
        await self.app(scope, receive, send)


class RestorePaths:
    """The first of the service's middlewares: the real path again, for a path some route serves."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        real = scope.pop(REAL_PATH, None)
        if real is not None and scope["path"] != UNMATCHED:
            scope["path"] = real
        await self.app(scope, receive, send)


class NotFound:
    """Answers a path no route serves with a JSON 404 (after authentication: a client without a
    key learns nothing about which paths exist)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != UNMATCHED:
            await self.app(scope, receive, send)
            return
        response: Any = error_response(404, "not found: no route serves this path (the OpenAPI document lists them)")
        await response(scope, receive, send)
