"""What the app talks to: the `Backend` protocol and `LocalBackend`, the engine in this process
(tests, single-process use). Under Ray Serve it is `deployment.RayBackend`, a handle to the
Personalizer deployment; both turn a failed request into a `ServingError`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Protocol

from feddpa.serving.batcher import Parts, streamed
from feddpa.serving.engine import Request as EngineRequest
from feddpa.serving.engine import Result, ServingEngine
from feddpa.serving.errors import ServingError, failure_of


class Backend(Protocol):
    async def run(self, req: EngineRequest) -> Result: ...

    def stream(
        self, req: EngineRequest
    ) -> AsyncGenerator[str | Result, None]: ...  # deltas, result

    async def describe(self) -> dict: ...  # {"clients": [...], "version": str, "kind": str}


class LocalBackend:
    """The engine in this process (tests, single-process use)."""

    def __init__(self, engine: ServingEngine) -> None:
        self.engine = engine

    async def run(self, req: EngineRequest) -> Result:
        try:
            await asyncio.to_thread(self.engine.validate, req)  # as the Serve replica does
            return (await asyncio.to_thread(self.engine.run_batch, [req]))[0]
        except Exception as err:
            raise ServingError(failure_of(err, req.request_id)) from None

    async def stream(self, req: EngineRequest) -> AsyncGenerator[str | Result, None]:
        try:
            await asyncio.to_thread(self.engine.validate, req)
            parts = Parts(asyncio.get_running_loop())
            run = asyncio.ensure_future(asyncio.to_thread(self._run_one, req, parts))
            async for item in streamed(parts, run):
                yield item
        except Exception as err:
            raise ServingError(failure_of(err, req.request_id)) from None

    def _run_one(self, req: EngineRequest, parts: Parts) -> Result:
        return self.engine.run_batch([req], lambda _, delta: parts.put(delta))[0]

    async def describe(self) -> dict:
        return self.engine.describe()
