"""The outermost layer of the app (plain ASGI, so it runs before any route reads the body):

- authentication: with a tokens file, every path but the public ones needs a valid bearer token
  (401 otherwise) — checked before the body is read, so an unauthenticated request never learns
  anything about the body it sent; `/metrics` needs the admin token;
- body size: a declared `Content-Length` over `max_body_bytes` is refused (413) before a byte is
  read, and a chunked body is counted as it streams in and refused the moment it passes the limit;
- request id: every request gets one (`request.state.request_id`, the X-Request-ID header of
  its response, and the `request_id` of an error body), and the log names it;
- metrics: every request counted by its route *template* (`/v1/clients/{client_id}/predict`) and
  status, a path that matches no route as "unmatched", so labels stay bounded whatever is sent.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from feddpa.serving.app import AppState

PUBLIC = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
ADMIN_ONLY = frozenset({"/metrics"})


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "feddpa_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "feddpa_request_seconds", "request latency", ["route"], registry=self.registry
        )


def bearer_token(headers: Headers) -> str | None:
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


UNMATCHED = "unmatched"
REQUEST_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # an incoming id is logged: nothing else


def route_label(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The template of the route `scope` goes to (method aside), or UNMATCHED."""
    for route in routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            return getattr(route, "path", UNMATCHED)
    return UNMATCHED


class Guard:
    def __init__(
        self, app: ASGIApp, state: Callable[[], AppState], routes: Sequence[BaseRoute]
    ) -> None:
        self.app = app
        self.state = state
        self.routes = routes  # the app's route list (filled after this layer is added)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.state().metrics
        label = route_label(self.routes, scope)
        status = 500  # unless a response starts
        start = time.perf_counter()
        given = Headers(scope=scope).get("x-request-id", "")
        # Serve's proxy puts its id there (and on the response): one id for both logs
        rid = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        add_header = self.state().request_id_header

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if add_header:
                    MutableHeaders(scope=message)["X-Request-ID"] = rid
            await send(message)

        try:
            refused = self.refusal(scope["path"], Headers(scope=scope), rid)
            if refused is not None:
                await refused(scope, receive, send_counted)
            else:
                await self.app(scope, self.counted(receive), send_counted)
        finally:
            metrics.requests.labels(label, str(status)).inc()
            metrics.latency.labels(label).observe(time.perf_counter() - start)

    def refusal(self, path: str, headers: Headers, rid: str) -> JSONResponse | None:
        """The 401 / 413 answer for a request that must not reach a route, or None."""
        state = self.state()
        if state.tokens is not None and path not in PUBLIC:
            token = bearer_token(headers)
            if token is None:
                return unauthorized("missing bearer token", rid)
            if path in ADMIN_ONLY:
                if not state.tokens.is_admin(token):
                    return unauthorized(f"{path} needs the admin token", rid)
            elif not state.tokens.is_admin(token) and state.tokens.client_of(token) is None:
                return unauthorized("invalid bearer token", rid)
        declared = headers.get("content-length")
        limit = state.limits.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            body = {"detail": body_too_large(limit), "request_id": rid}
            return JSONResponse(body, status_code=413)
        return None

    def counted(self, receive: Receive) -> Receive:
        """`receive` that refuses (413) a body growing past the limit while it streams in."""
        limit = self.state().limits.max_body_bytes
        seen = 0

        async def receive_counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, body_too_large(limit))  # the route answers it
            return message

        return receive_counted


def body_too_large(limit: int) -> str:
    return f"request body is over the limit of {limit} bytes"


def unauthorized(detail: str, rid: str) -> JSONResponse:
    body = {"detail": detail, "request_id": rid}
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
