"""The outermost layer of the app (plain ASGI, so it runs before any route reads the body):

- authentication: with a tokens file, every path but the public ones needs a valid bearer token
  (401 otherwise) — checked before the body is read, so an unauthenticated request never learns
  anything about the body it sent; `/metrics` needs the admin token;
- body size: a declared `Content-Length` over `max_body_bytes` is refused (413) before a byte is
  read, and a chunked body is counted as it streams in and refused the moment it passes the limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from feddpa.serving.app import AppState

PUBLIC = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
ADMIN_ONLY = frozenset({"/metrics"})


def bearer_token(headers: Headers) -> str | None:
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


class Guard:
    def __init__(self, app: ASGIApp, state: Callable[[], AppState]) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refused = self.refusal(scope["path"], headers)
        if refused is not None:
            await refused(scope, receive, send)
            return
        await self.app(scope, self.counted(receive), send)

    def refusal(self, path: str, headers: Headers) -> JSONResponse | None:
        """The 401 / 413 answer for a request that must not reach a route, or None."""
        state = self.state()
        if state.tokens is not None and path not in PUBLIC:
            token = bearer_token(headers)
            if token is None:
                return unauthorized("missing bearer token")
            if path in ADMIN_ONLY:
                if not state.tokens.is_admin(token):
                    return unauthorized(f"{path} needs the admin token")
            elif not state.tokens.is_admin(token) and state.tokens.client_of(token) is None:
                return unauthorized("invalid bearer token")
        declared = headers.get("content-length")
        limit = state.limits.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return JSONResponse({"detail": body_too_large(limit)}, status_code=413)
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


def unauthorized(detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
