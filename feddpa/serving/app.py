"""The FastAPI app, assembled by `build_app` (vLLM's pattern): the native and the OpenAI-compatible
routers over one `CompletionService`, behind the metrics, request-id, authentication and body-limit
layers, with every error mapped to the documented JSON body. The app talks to a `Backend`
(feddpa.serving.backends) — in Ray Serve a handle to the Personalizer deployment, in tests an
in-process engine — so the HTTP contract is the same either way. No app exists until
`build_app` is called.

Errors never surface as 500: bad bodies → 422 naming the field, unknown client → 404, wrong or
missing token → 401/403, prompt over the limit → 413, queue full → 503 with Retry-After.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from feddpa.serving import native_routes, openai_routes
from feddpa.serving.backends import Backend, LocalBackend
from feddpa.serving.errors import ServingError, internal_error
from feddpa.serving.limits import Limits
from feddpa.serving.metrics import Metrics, MetricsMiddleware
from feddpa.serving.middleware import (
    AuthMiddleware,
    BodyLimitMiddleware,
    RequestIdMiddleware,
    error_response,
    request_id,
)
from feddpa.serving.service import AppState, CompletionService, as_http, completion_service

__all__ = ["AppState", "Backend", "Limits", "LocalBackend", "Metrics", "build_app"]
log = logging.getLogger(__name__)


def build_app(state: AppState) -> FastAPI:
    """A new app serving `state`."""
    app = FastAPI(
        title="feddpa",
        version="0.1.0",
        description="Per-client personalized inference (FedDPA dual adapters)",
        exception_handlers={
            RequestValidationError: invalid_body,
            StarletteHTTPException: http_error,
            ServingError: backend_failed,
            Exception: unexpected,
        },
    )
    app.state.service = CompletionService(state)
    app.include_router(native_routes.router)
    app.include_router(openai_routes.router)
    # each layer wraps the ones added before it: the metrics count every answer, the id is set
    # before anything can refuse, and the token is checked before the body is read
    limits = state.limits
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s
    )
    app.add_middleware(
        AuthMiddleware,
        tokens=state.tokens,
        max_connections=limits.max_token_connections,
        retry_after_s=limits.retry_after_s,
    )
    app.add_middleware(RequestIdMiddleware, header=state.request_id_header)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, routes=app.router.routes)
    return app


async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field, without echoing the input: a body may hold text that cannot be
    encoded in a response (a lone surrogate; FastAPI's default handler then fails with 500), and
    echoing it only repeats what the client sent."""
    errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return error_response(request, 422, errors)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(request, exc.status_code, exc.detail, exc.headers)


async def backend_failed(request: Request, exc: ServingError) -> JSONResponse:
    """A backend call outside a model request (the client list) failed: its typed failure."""
    limits = completion_service(request).state.limits
    return await http_error(request, as_http(exc.failure, limits))


async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug: the traceback goes to the log with the request id, the client gets the id (the
    header too: this answer is sent outside the request-id layer)."""
    rid = request_id(request)
    log.error("request %s failed", rid, exc_info=exc)
    return error_response(request, 500, internal_error(rid), {"X-Request-ID": rid})
