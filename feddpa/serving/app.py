"""The FastAPI app: routes, auth, limits and error mapping. It talks to a `Backend`
(feddpa.serving.backends) — in Ray Serve a handle to the Personalizer deployment, in tests an
in-process engine — so the HTTP contract is the same either way.

Errors never surface as 500: bad bodies → 422 naming the field, unknown client → 404, wrong or
missing token → 401/403, prompt over the limit → 413, queue full → 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter as CounterOf
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from feddpa.core.records import Example, format_options, parse_options
from feddpa.serving import schemas as s
from feddpa.serving.auth import TokenStore
from feddpa.serving.backends import Backend, LocalBackend
from feddpa.serving.engine import Request as EngineRequest
from feddpa.serving.engine import Result
from feddpa.serving.errors import ServingError, internal_error
from feddpa.serving.guard import Guard, Metrics
from feddpa.serving.limits import Limits, check_options, check_text, new_tokens
from feddpa.serving.openai_compat import (
    DONE,
    STREAM_CONTENT,
    Chunks,
    chat_body,
    completion_body,
    event,
    stream_error,
)

__all__ = ["AppState", "Backend", "Limits", "LocalBackend", "Metrics", "build_app"]
log = logging.getLogger(__name__)


ERROR_RESPONSES: dict[int | str, dict] = {
    **{code: {"model": s.ErrorBody} for code in (401, 403, 404, 413, 429, 503, 504)},
    422: {"model": s.InvalidBody},
}
bearer = HTTPBearer(auto_error=False)
Creds = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def request_id(request: Request) -> str:
    """The id `Guard` gave this request (also in its X-Request-ID header)."""
    return getattr(request.state, "request_id", "-")


def error_response(
    request: Request, status: int, detail: object, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The documented error body: {"detail": ..., "request_id": ...}."""
    body = {"detail": detail, "request_id": request_id(request)}
    return JSONResponse(body, status_code=status, headers=headers)


def parse_client(text: str) -> int:
    """'3', 'client-3' or 'client_00003' -> 3."""
    digits = text.removeprefix("client").lstrip("-_")
    # isdigit() alone admits '²' and ids past int()'s 4300-digit limit: both made int() raise (500)
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 18:
        raise HTTPException(404, f"unknown client {text!r}: use an id from GET /v1/clients")
    return int(digits)


@dataclass
class AppState:
    """What the routes need; resolved per request so Serve replicas can supply their own."""

    backend: Backend
    tokens: TokenStore | None = None
    limits: Limits = field(default_factory=Limits)
    metrics: Metrics = field(default_factory=lambda: Metrics())
    inflight: int = 0  # model requests in flight in this ingress replica
    client_inflight: CounterOf[int] = field(default_factory=lambda: CounterOf())  # per client
    request_id_header: bool = True  # False behind Serve's proxy, which sets X-Request-ID itself


def build_app(state: Callable[[], AppState]) -> FastAPI:
    app = FastAPI(
        title="feddpa",
        version="0.1.0",
        description="Per-client personalized inference (FedDPA dual adapters)",
    )
    app.add_middleware(Guard, state=state, routes=app.router.routes)
    started = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming each bad field, without echoing the input: a body may hold text that cannot
        be encoded in a response (a lone surrogate; FastAPI's default handler then fails with
        500), and echoing it only repeats what the client sent."""
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return error_response(request, 422, errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, exc.detail, exc.headers)

    @app.exception_handler(ServingError)
    async def backend_failed(request: Request, exc: ServingError) -> JSONResponse:
        """A backend call outside a model request (the client list) failed: its typed failure."""
        retry = state().limits.retry() if exc.failure.retry else None
        return error_response(request, exc.failure.status, exc.failure.message, retry)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        """A bug: the traceback goes to the log with the request id, the client gets the id."""
        rid = request_id(request)
        log.error("request %s failed", rid, exc_info=exc)
        return error_response(request, 500, internal_error(rid), {"X-Request-ID": rid})

    def token_scope(creds: HTTPAuthorizationCredentials | None) -> int | None:
        """The one client a bearer token opens; None when it opens all (admin, or auth off)."""
        store: TokenStore | None = state().tokens
        if store is None:
            return None
        if creds is None:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if store.is_admin(creds.credentials):
            return None
        owner = store.client_of(creds.credentials)
        if owner is None:
            raise HTTPException(401, "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
        return owner

    async def authorize(
        request: Request, cid: int, creds: HTTPAuthorizationCredentials | None
    ) -> None:
        owner = token_scope(creds)
        if owner is not None and owner != cid:
            raise HTTPException(403, f"this token opens client {owner} only, not client {cid}")

    async def known(request: Request, cid: int) -> dict:
        info = await state().backend.describe()
        if cid not in info["clients"]:
            raise HTTPException(404, f"unknown client {cid}: use an id from GET /v1/clients")
        return info

    @asynccontextmanager
    async def admitted(request: Request, req: EngineRequest) -> AsyncIterator[EngineRequest]:
        """The request with the replica's limits, counted in flight while the block runs (503 /
        429 when the queue / the client's share is full)."""
        limits: Limits = state().limits
        req = replace(
            req,
            max_prompt_tokens=limits.max_prompt_tokens,
            max_beams=limits.max_beams,
            request_id=request_id(request),
        )
        here = state()
        if here.inflight >= limits.max_queue:
            raise HTTPException(503, "overloaded, retry later", headers=limits.retry())
        cid = req.client_id
        if here.client_inflight[cid] >= limits.max_client_inflight:
            raise HTTPException(
                429,
                f"client {cid} has {here.client_inflight[cid]} requests in flight; the limit is "
                f"{limits.max_client_inflight}: wait for answers before sending more",
                headers=limits.retry(),
            )
        here.inflight += 1
        here.client_inflight[cid] += 1
        try:
            yield req
        except (TimeoutError, asyncio.TimeoutError):  # distinct classes on Python 3.10
            raise HTTPException(
                504,
                f"no answer within {limits.request_timeout_s:g} s (request cancelled); retry later",
                headers=limits.retry(),
            ) from None
        except ServingError as err:
            failed = err.failure
            retry = limits.retry() if failed.retry else None
            raise HTTPException(failed.status, failed.message, headers=retry) from None
        finally:
            here.inflight -= 1
            here.client_inflight[cid] -= 1
            if not here.client_inflight[cid]:
                del here.client_inflight[cid]  # bounded: only clients with requests in flight

    async def execute(request: Request, req: EngineRequest) -> Result:
        async with admitted(request, req) as req:
            return await asyncio.wait_for(
                state().backend.run(req), state().limits.request_timeout_s
            )

    async def stream_items(
        request: Request, req: EngineRequest
    ) -> AsyncGenerator[str | Result, None]:
        """The backend's text deltas, then the result, all within the request timeout."""
        loop = asyncio.get_running_loop()
        async with admitted(request, req) as req:
            items = state().backend.stream(req)
            deadline = loop.time() + state().limits.request_timeout_s
            try:
                while True:
                    try:
                        item = await asyncio.wait_for(anext(items), deadline - loop.time())
                    except StopAsyncIteration:
                        return
                    yield item
            finally:
                await items.aclose()

    async def open_stream(
        request: Request, req: EngineRequest
    ) -> AsyncGenerator[str | Result, None]:
        """`stream_items`, started: an error before the first delta (a bad request, a full
        queue, a timeout) is still an HTTP error with its status; later ones are SSE events."""
        items = stream_items(request, req)
        first = await anext(items)

        async def resumed() -> AsyncGenerator[str | Result, None]:
            try:
                yield first
                async for item in items:
                    yield item
            finally:
                await items.aclose()

        return resumed()

    async def sse(
        request: Request, items: AsyncGenerator[str | Result, None], chunks: Chunks
    ) -> AsyncIterator[str]:
        """Server-sent events as the OpenAI API sends them: `data: {chunk}` per delta, a last
        chunk with the finish reason, `data: [DONE]`; an error after the first byte is an event
        `data: {"error": {...}}` (what the openai client raises as APIError) and ends the stream."""
        try:
            for chunk in chunks.start():
                yield event(chunk)
            async for item in items:
                if isinstance(item, str):
                    yield event(chunks.delta(item))
                else:
                    for chunk in chunks.finish(item):
                        yield event(chunk)
            yield DONE
        except HTTPException as err:
            yield event(stream_error(request_id(request), err.status_code, str(err.detail)))
        except Exception as err:
            rid = request_id(request)
            log.error("request %s failed while streaming", rid, exc_info=err)
            yield event(stream_error(rid, 500, internal_error(rid)))
        finally:
            await items.aclose()

    def weights(r: Result) -> s.Weights:
        return s.Weights(global_adapter=r.global_weight, local_adapter=r.local_weight)

    def mc_example(instruction: str, options: list[str] | None) -> Example:
        limits: Limits = state().limits
        opts = options or list(parse_options(instruction))
        if len(opts) < 2:
            raise HTTPException(
                422, "give 'options' (two or more) or end the instruction with an OPTIONS: block"
            )
        check_options(opts, limits)
        text = format_options(instruction, opts) if options else instruction
        return Example(text, opts[0], "request")

    @app.get("/healthz")
    async def healthz(request: Request) -> dict:
        """ "ok", or "degraded" with the reason while a newer round fails to load (the previous
        round is still served, so the answer stays 200)."""
        info = await state().backend.describe()
        health = {"status": "ok", "version": info["version"], "clients": len(info["clients"])}
        if info.get("problem"):
            health.update(status="degraded", reason=info["problem"])
        return health

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(request: Request) -> PlainTextResponse:
        return PlainTextResponse(
            generate_latest(state().metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    @app.get("/v1/clients", response_model=s.ClientsResponse)
    async def clients(request: Request, creds: Creds) -> s.ClientsResponse:
        info = await state().backend.describe()
        owner = token_scope(creds)
        visible = info["clients"] if owner is None else [owner]
        return s.ClientsResponse(
            clients=[s.ClientInfo(client_id=c, model=f"client-{c}") for c in visible],
            version=info["version"],
            model_kind=info["kind"],
        )

    @app.post(
        "/v1/clients/{client_id}/predict",
        response_model=s.PredictResponse,
        responses=ERROR_RESPONSES,
    )
    async def predict(
        client_id: int,
        body: s.PredictRequest,
        request: Request,
        creds: Creds,
    ) -> s.PredictResponse:
        await authorize(request, client_id, creds)
        await known(request, client_id)
        check_text("instruction", body.instruction, state().limits.max_prompt_chars)
        example = mc_example(body.instruction, body.options)
        r = await execute(request, EngineRequest(client_id, example, "predict", body.weighting))
        return s.PredictResponse(
            client_id=client_id,
            choice=r.choice,
            options=list(example.options),
            probs=r.probs,
            weights=weights(r),
            version=r.version,
        )

    @app.post(
        "/v1/clients/{client_id}/generate",
        response_model=s.GenerateResponse,
        responses=ERROR_RESPONSES,
    )
    async def generate(
        client_id: int,
        body: s.GenerateRequest,
        request: Request,
        creds: Creds,
    ) -> s.GenerateResponse:
        await authorize(request, client_id, creds)
        info = await known(request, client_id)
        if info["kind"] != "causal_lm":
            raise HTTPException(422, "this run's model is multiple_choice: use /predict")
        check_text("prompt", body.prompt, state().limits.max_prompt_chars)
        req = EngineRequest(
            client_id,
            Example(body.prompt, "", "request"),
            "generate",
            body.weighting,
            new_tokens(body.max_tokens, state().limits),
        )
        r = await execute(request, req)
        return s.GenerateResponse(
            client_id=client_id, text=r.text, weights=weights(r), version=r.version
        )

    async def complete(
        request: Request,
        model: str,
        prompt: str,
        max_tokens: int | None,
        creds: Creds,
        what: str,
        stream: Chunks | None,
    ) -> Result | StreamingResponse:
        """A completion of `prompt` (the body field `what`) by the client named `model`; streamed
        as server-sent events when `stream` gives the chunks to send."""
        cid = parse_client(model)
        await authorize(request, cid, creds)
        info = await known(request, cid)
        check_text(what, prompt, state().limits.max_prompt_chars)
        if info["kind"] != "causal_lm":
            if stream is not None:
                raise HTTPException(
                    422,
                    "stream: this run's model is multiple_choice: it picks one of the OPTIONS "
                    "in one step and cannot stream; send stream: false",
                )
            example = mc_example(prompt, None)
            return await execute(request, EngineRequest(cid, example, "predict"))
        limit = new_tokens(max_tokens, state().limits)
        req = EngineRequest(cid, Example(prompt, "", "request"), "generate", None, limit)
        if stream is None:
            return await execute(request, req)
        items = await open_stream(request, req)
        return StreamingResponse(
            sse(request, items, stream),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    def chunks_for(
        body: s.CompletionRequest | s.ChatCompletionRequest, chat: bool
    ) -> Chunks | None:
        if not body.stream:
            return None
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return Chunks(body.model, chat, include_usage)

    @app.post(
        "/v1/completions",
        response_model=s.CompletionResponse,
        responses={**ERROR_RESPONSES, 200: STREAM_CONTENT},
    )
    async def completions(
        body: s.CompletionRequest,
        request: Request,
        creds: Creds,
    ) -> s.CompletionResponse | Response:
        r = await complete(
            request,
            body.model,
            body.prompt,
            body.max_tokens,
            creds,
            "prompt",
            chunks_for(body, chat=False),
        )
        if isinstance(r, StreamingResponse):
            return r
        return completion_body(body.model, r)

    @app.post(
        "/v1/chat/completions",
        response_model=s.ChatCompletionResponse,
        responses={**ERROR_RESPONSES, 200: STREAM_CONTENT},
    )
    async def chat(
        body: s.ChatCompletionRequest,
        request: Request,
        creds: Creds,
    ) -> s.ChatCompletionResponse | Response:
        if len(body.messages) > state().limits.max_messages:
            raise HTTPException(
                413,
                f"messages has {len(body.messages)} entries; "
                f"the limit is {state().limits.max_messages}",
            )
        prompt = "\n\n".join(
            m.content for m in body.messages if m.role in ("system", "developer", "user")
        )
        if not prompt.strip():
            raise HTTPException(422, "messages: at least one non-empty user message is required")
        r = await complete(
            request,
            body.model,
            prompt,
            body.max_completion_tokens or body.max_tokens,
            creds,
            "messages",
            chunks_for(body, chat=True),
        )
        if isinstance(r, StreamingResponse):
            return r
        return chat_body(body.model, r)

    @app.get("/v1/models", response_model=s.ModelList, responses=ERROR_RESPONSES)
    async def models(request: Request, creds: Creds) -> s.ModelList:
        listed = await clients(request, creds)
        return s.ModelList(data=[s.ModelCard(id=c.model, created=started) for c in listed.clients])

    return app
