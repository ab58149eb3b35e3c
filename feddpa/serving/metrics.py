"""Request metrics: every request counted by its route *template*
(`/v1/clients/{client_id}/predict`) and status, a path that matches no route as "unmatched", so
labels stay bounded whatever is sent. `Metrics` is one app's registry (`GET /metrics` shows it);
`MetricsMiddleware` counts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from fastapi.routing import iter_route_contexts
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED = "unmatched"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "feddpa_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "feddpa_request_seconds", "request latency", ["route"], registry=self.registry
        )


def route_label(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The template of the route `scope` goes to (method aside), or UNMATCHED. FastAPI keeps an
    included router's routes inside it; `iter_route_contexts` lists them with their paths."""
    for route in iter_route_contexts(routes):
        match, _ = route.matches(scope)
        if match != Match.NONE:
            return route.path or UNMATCHED
    return UNMATCHED


class MetricsMiddleware:
    """Counts every answer with its status and latency, the inner layers' refusals included; an
    answer that never started (an unexpected error) counts as 500."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # the app's route list (filled after this layer is added)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        label = route_label(self.routes, scope)
        status = 500  # unless a response starts
        start = time.perf_counter()

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)
