"""What the routes share: `CompletionService` opens a client to a request (its token's scope, the
run's clients), runs the backend call counted against the limits and bounded by the request
timeout, and streams an answer as server-sent events. `AppState` is what one app serves with."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter as CounterOf
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.responses import StreamingResponse

from feddpa.core.records import Example, parse_options
from feddpa.serving import schemas as s
from feddpa.serving.auth import TokenStore
from feddpa.serving.backends import Backend
from feddpa.serving.engine import Request as EngineRequest
from feddpa.serving.engine import Result
from feddpa.serving.errors import Failure, ServingError, internal_error
from feddpa.serving.limits import Limits, check_options, check_text, new_tokens
from feddpa.serving.metrics import Metrics
from feddpa.serving.openai_compat import DONE, Chunks, event, stream_error

log = logging.getLogger(__name__)
DESCRIBE_TTL_S = 1.0  # how long the client list / served round / health answer is reused


@dataclass
class AppState:
    """What one app serves with (one per Serve ingress replica): its backend, tokens, limits and
    metrics, and the model requests it has in flight."""

    backend: Backend
    tokens: TokenStore | None = None
    limits: Limits = field(default_factory=Limits)
    metrics: Metrics = field(default_factory=Metrics)
    inflight: int = 0  # model requests in flight in this ingress replica
    client_inflight: CounterOf[int] = field(default_factory=lambda: CounterOf())  # per client
    request_id_header: bool = True  # False behind Serve's proxy, which sets X-Request-ID itself


def as_http(failure: Failure, limits: Limits) -> HTTPException:
    """The HTTP answer to a backend's typed failure, with Retry-After where it may pass."""
    return HTTPException(
        failure.status, failure.message, headers=limits.retry() if failure.retry else None
    )


class CompletionService:
    """The logic the native and the OpenAI routes share, over one app's `AppState`."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.started = int(time.time())  # the model cards' `created`
        self.info: dict | None = None  # the backend's last `describe()`, and when it came
        self.info_at = 0.0
        self.describing = asyncio.Lock()  # one client-list call in flight per app

    async def describe(self) -> dict:
        """{"clients", "version", "kind"} and, while a newer round fails to load, "problem".

        Every route asks (health checks too), so the answer is kept for `DESCRIBE_TTL_S`: the
        backend (under Serve, the Personalizer, which then looks at the run's LATEST round) is
        called at most once per interval whatever the request rate, one call at a time, and a call
        that does not come back within the request timeout is a 503, never a slot held forever."""
        async with self.describing:
            if self.info is None or time.monotonic() >= self.info_at + DESCRIBE_TTL_S:
                limits = self.state.limits
                try:
                    info = await asyncio.wait_for(
                        self.state.backend.describe(), limits.request_timeout_s
                    )
                except (TimeoutError, asyncio.TimeoutError):  # distinct classes on Python 3.10
                    raise HTTPException(
                        503,
                        f"the model replicas did not list the clients within "
                        f"{limits.request_timeout_s:g} s; retry later",
                        headers=limits.retry(),
                    ) from None
                self.info, self.info_at = info, time.monotonic()
            return self.info

    async def clients(self, owner: int | None) -> s.ClientsResponse:
        """The clients the request's token opens (`owner`; None: all)."""
        info = await self.describe()
        visible = info["clients"] if owner is None else [owner]
        return s.ClientsResponse(
            clients=[s.ClientInfo(client_id=c, model=f"client-{c}") for c in visible],
            version=info["version"],
            model_kind=info["kind"],
        )

    async def open_client(self, owner: int | None, cid: int) -> dict:
        """`describe()`, once client `cid` is open to the token (403) and one of the run's (404)."""
        if owner is not None and owner != cid:
            raise HTTPException(403, f"this token opens client {owner} only, not client {cid}")
        info = await self.describe()
        if cid not in info["clients"]:
            raise HTTPException(404, f"unknown client {cid}: use an id from GET /v1/clients")
        return info

    def mc_example(self, instruction: str, options: list[str] | None) -> Example:
        """A multiple-choice item: `options`, or the instruction's OPTIONS block, parsed once
        here. The item carries the list checked against the limits (`Example.choices`): the
        engine never parses the formatted text again."""
        opts = list(options) if options else list(parse_options(instruction))
        if len(opts) < 2:
            raise HTTPException(
                422, "give 'options' (two or more) or end the instruction with an OPTIONS: block"
            )
        check_options(opts, self.state.limits)
        if options:
            return Example.multiple_choice(instruction, opts, "request")
        return Example(instruction, opts[0], "request", choices=tuple(opts))

    async def run(self, rid: str, req: EngineRequest) -> Result:
        async with self.admitted(rid, req) as req:
            return await asyncio.wait_for(
                self.state.backend.run(req), self.state.limits.request_timeout_s
            )

    async def complete(
        self,
        rid: str,
        owner: int | None,
        cid: int,
        prompt: str,
        max_tokens: int | None,
        what: str,
        stream: Chunks | None,
    ) -> Result | StreamingResponse:
        """A completion of `prompt` (the body field `what`) by client `cid`; streamed as
        server-sent events when `stream` gives the chunks to send."""
        info = await self.open_client(owner, cid)
        check_text(what, prompt, self.state.limits.max_prompt_chars)
        if info["kind"] != "causal_lm":
            if stream is not None:
                raise HTTPException(
                    422,
                    "stream: this run's model is multiple_choice: it picks one of the OPTIONS "
                    "in one step and cannot stream; send stream: false",
                )
            return await self.run(rid, EngineRequest(cid, self.mc_example(prompt, None), "predict"))
        limit = new_tokens(max_tokens, self.state.limits)
        req = EngineRequest(cid, Example(prompt, "", "request"), "generate", None, limit)
        if stream is None:
            return await self.run(rid, req)
        items = await self._started(rid, req)
        return StreamingResponse(
            self._events(rid, items, stream),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    @asynccontextmanager
    async def admitted(self, rid: str, req: EngineRequest) -> AsyncIterator[EngineRequest]:
        """The request with the replica's limits, counted in flight while the block runs (503 /
        429 when the queue / the client's share is full; 504 past the timeout)."""
        here, limits = self.state, self.state.limits
        req = replace(
            req,
            max_prompt_tokens=limits.max_prompt_tokens,
            max_beams=limits.max_beams,
            request_id=rid,
        )
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
            raise as_http(err.failure, limits) from None
        finally:
            here.inflight -= 1
            here.client_inflight[cid] -= 1
            if not here.client_inflight[cid]:
                del here.client_inflight[cid]  # bounded: only clients with requests in flight

    async def _items(self, rid: str, req: EngineRequest) -> AsyncGenerator[str | Result, None]:
        """The backend's text deltas, then the result, all within the request timeout."""
        loop = asyncio.get_running_loop()
        async with self.admitted(rid, req) as req:
            items = self.state.backend.stream(req)
            deadline = loop.time() + self.state.limits.request_timeout_s
            try:
                while True:
                    try:
                        item = await asyncio.wait_for(anext(items), deadline - loop.time())
                    except StopAsyncIteration:
                        return
                    yield item
            finally:
                await items.aclose()

    async def _started(self, rid: str, req: EngineRequest) -> AsyncGenerator[str | Result, None]:
        """`_items`, started: an error before the first delta (a bad request, a full queue, a
        timeout) is still an HTTP error with its status; later ones are SSE events."""
        items = self._items(rid, req)
        first = await anext(items)

        async def resumed() -> AsyncGenerator[str | Result, None]:
            try:
                yield first
                async for item in items:
                    yield item
            finally:
                await items.aclose()

        return resumed()

    async def _events(
        self, rid: str, items: AsyncGenerator[str | Result, None], chunks: Chunks
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
            yield event(stream_error(rid, err.status_code, str(err.detail)))
        except Exception as err:
            log.error("request %s failed while streaming", rid, exc_info=err)
            yield event(stream_error(rid, 500, internal_error(rid)))
        finally:
            await items.aclose()


def completion_service(request: Request) -> CompletionService:
    """The app's service (a FastAPI dependency: `build_app` keeps it in `app.state`)."""
    return request.app.state.service


Service = Annotated[CompletionService, Depends(completion_service)]
