"""The app's outer layers, plain ASGI so that they run before any route reads the body (the
metrics layer is in `metrics.py`):

- `RequestIdMiddleware`: every request gets an id (`request.state.request_id`, the X-Request-ID
  header of its response, the `request_id` of an error body), and the log names it;
- `AuthMiddleware`: with a tokens file, every path but the public ones needs a valid bearer token
  (401 otherwise), checked before the body is read, so an unauthenticated request never learns
  anything about the body it sent; `/metrics` needs the admin token. It is the one check: routes
  read what it found (`token_owner`), never the token. A client token has at most
  `max_token_connections` requests open, counted from before the body is read (429 beyond), so one
  token's slow uploads cannot hold every slot;
- `BodyLimitMiddleware`: a declared `Content-Length` over the limit is refused (413) before a byte
  is read, and a chunked body is counted as it streams in and refused the moment it passes the
  limit; a body not received within `body_timeout_s` of the request's start is refused (408).
  uvicorn bounds neither a body's size nor the time it takes to arrive.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections import Counter
from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from feddpa.serving.auth import TokenStore

PUBLIC = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
ADMIN_ONLY = frozenset({"/metrics"})
REQUEST_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # an incoming id is logged: nothing else


def request_id(request: Request) -> str:
    """The id `RequestIdMiddleware` gave this request (also in its X-Request-ID header)."""
    return getattr(request.state, "request_id", "-")


def error_response(
    request: Request, status: int, detail: object, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The documented error body: {"detail": ..., "request_id": ...}."""
    body = {"detail": detail, "request_id": request_id(request)}
    return JSONResponse(body, status_code=status, headers=headers)


class RequestIdMiddleware:
    """Keeps an incoming plain X-Request-ID (Serve's proxy sets one: one id for both logs), else
    makes one; `header`: whether to put it on the response (Serve's proxy does that itself)."""

    def __init__(self, app: ASGIApp, header: bool = True) -> None:
        self.app = app
        self.header = header

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        rid = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = rid
            await send(message)

        await self.app(scope, receive, send_with_id if self.header else send)


class Unauthorized(Exception):
    pass


class AuthMiddleware:
    """Refuses (401) a request without a token that opens its path; otherwise records the one
    client the token opens (`request.state.token_owner`; None: all, for the admin token or without
    a tokens file). A client token with `max_connections` requests open gets 429 at once."""

    def __init__(
        self,
        app: ASGIApp,
        tokens: TokenStore | None,
        max_connections: int = 64,
        retry_after_s: int = 1,
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.max_connections = max_connections
        self.retry_after_s = retry_after_s
        self.open: Counter[int] = Counter()  # per client token: requests open (bounded: > 0 only)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC:
            await self.app(scope, receive, send)
            return
        try:
            owner = self.owner(scope["path"], Headers(scope=scope))
        except Unauthorized as err:
            refused = error_response(Request(scope), 401, str(err), {"WWW-Authenticate": "Bearer"})
            await refused(scope, receive, send)
            return
        scope.setdefault("state", {})["token_owner"] = owner
        if owner is None:  # the admin token, or no tokens file: the service-wide limits apply
            await self.app(scope, receive, send)
            return
        if self.open[owner] >= self.max_connections:
            detail = (
                f"the token of client {owner} has {self.open[owner]} requests open; the limit is "
                f"{self.max_connections}: wait for answers (or finish sending bodies) first"
            )
            headers = {"Retry-After": str(self.retry_after_s)}
            await error_response(Request(scope), 429, detail, headers)(scope, receive, send)
            return
        self.open[owner] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open[owner] -= 1
            if not self.open[owner]:
                del self.open[owner]

    def owner(self, path: str, headers: Headers) -> int | None:
        if self.tokens is None:
            return None
        token = bearer_token(headers)
        if token is None:
            raise Unauthorized("missing bearer token")
        if self.tokens.is_admin(token):
            return None
        if path in ADMIN_ONLY:
            raise Unauthorized(f"{path} needs the admin token")
        owner = self.tokens.client_of(token)
        if owner is None:
            raise Unauthorized("invalid bearer token")
        return owner


def bearer_token(headers: Headers) -> str | None:
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


bearer = HTTPBearer(auto_error=False)  # declares the scheme in the OpenAPI document only


def token_owner(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> int | None:
    """The one client the request's token opens; None when it opens all (what `AuthMiddleware`
    found: a route behind it without this record fails rather than opening every client)."""
    return request.state.token_owner


Owner = Annotated[int | None, Depends(token_owner)]
RequestId = Annotated[str, Depends(request_id)]


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 10.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            refused = error_response(Request(scope), 413, body_too_large(self.max_bytes))
            await refused(scope, receive, send)
            return
        await self.app(scope, self.counted(receive), send)

    def counted(self, receive: Receive) -> Receive:
        """`receive` that refuses a body growing past the limit while it streams in (413), or
        still arriving `timeout_s` after the request started (408). The route answers either."""
        seen = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        complete = False

        async def receive_counted() -> Message:
            nonlocal seen, complete
            if complete:  # the body is in: later calls wait for a disconnect, unbounded
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except (TimeoutError, asyncio.TimeoutError):  # distinct classes on Python 3.10
                raise HTTPException(
                    408,
                    f"the request body did not arrive within {self.timeout_s:g} s; send it "
                    "whole and at once (--body-timeout-s bounds the upload)",
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, body_too_large(self.max_bytes))
                complete = not message.get("more_body", False)
            return message

        return receive_counted


def body_too_large(limit: int) -> str:
    return f"request body is over the limit of {limit} bytes"
