"""Opportunistic batching for the serving replica: the next batch is formed when the engine becomes
free, from everything queued by then (up to `max_batch_size`).

Why not `serve.batch`: in Ray 2.60 its loop (`_BatchQueue._process_batches`) forms batches eagerly
and only then waits for a free slot (`max_concurrent_batches`). While one batch runs, each request
that arrives becomes its own batch of 1 waiting for that slot. Measured on the 2-core box at
concurrency 8: batches of 1-3, even with the model replaced by a 150 ms sleep. Here the worker
takes requests off the queue only when it can run them, so requests that arrive during a batch
all join the next one. When the queue is empty, it waits up to `wait_s` for company, as
`batch_wait_timeout_s` does.

Streaming: `stream(request)` yields the request's text deltas as the batch decodes them, then its
result. The batch function is then called as `run_batch(requests, on_text)`, `on_text(i, delta)`
being called from the worker thread; deltas cross to the event loop in order, before the result.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from typing import Any, Generic, TypeVar

from feddpa.serving.errors import Unavailable

Q = TypeVar("Q")
R = TypeVar("R")
_DONE = object()


class Parts:
    """One streamed request's text deltas, from the worker thread to the event loop.

    A batch that fails is rerun member by member; a member that already streamed text then
    decodes it again, and only what goes beyond the text already sent is passed on. A rerun whose
    text differs from what was sent (a batch and a lone row may decode differently) cannot be
    spliced onto it: the stream then ends with an error (`diverged`), never with mixed text."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.sent = ""  # text passed on so far
        self.seen = ""  # text decoded in the current run
        self.diverged = False

    def put(self, delta: str) -> None:  # worker thread
        start, self.seen = len(self.seen), self.seen + delta
        if self.diverged:
            return
        common = min(len(self.seen), len(self.sent))
        if self.seen[start:common] != self.sent[start:common]:
            self.diverged = True
            return
        new = self.seen[len(self.sent) :]
        if new:
            self.sent = self.seen
            self.loop.call_soon_threadsafe(self.queue.put_nowait, new)

    def rerun(self) -> None:
        self.seen = ""


class Diverged(Unavailable):
    """A streamed request's rerun decoded other text than the text already sent (503)."""


def diverged_error() -> Diverged:
    return Diverged(
        "the batch failed after this stream had started, and its rerun decoded other text: "
        "the text sent is not the answer; retry"
    )


async def streamed(parts: Parts, future: asyncio.Future[R]) -> AsyncGenerator[str | R, None]:
    """`parts`' deltas as they come, then `future`'s result (settled after the last delta)."""
    future.add_done_callback(lambda _: parts.queue.put_nowait(_DONE))
    try:
        while (item := await parts.queue.get()) is not _DONE:
            yield item
        yield await future
    finally:
        future.cancel()  # the caller went away: a queued request is then skipped


Item = tuple[Q, "asyncio.Future[R]", Parts | None]


class Batcher(Generic[Q, R]):
    def __init__(
        self, run_batch: Callable[..., list[R]], max_batch_size: int, wait_s: float
    ) -> None:
        if max_batch_size < 1 or wait_s < 0:
            raise ValueError("max_batch_size must be >= 1 and wait_s >= 0")
        self.run_batch = run_batch  # blocking; runs in a worker thread
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.queue: asyncio.Queue[Item] | None = None
        self.worker: asyncio.Task | None = None
        self.sizes: Counter[int] = Counter()  # batches run, by size (bounded: <= max keys)

    async def submit(self, request: Q) -> R:
        return await self._enqueue(request, None)

    def stream(self, request: Q) -> AsyncGenerator[str | R, None]:
        """The request's text deltas (str) as they are decoded, then its result."""
        parts = Parts(asyncio.get_running_loop())
        return streamed(parts, self._enqueue(request, parts))

    def _enqueue(self, request: Q, parts: Parts | None) -> asyncio.Future[R]:
        loop = asyncio.get_running_loop()
        if self.queue is None or self.worker is None or self.worker.done():
            self.queue = asyncio.Queue()
            self.worker = loop.create_task(self._work())
        future: asyncio.Future[R] = loop.create_future()
        self.queue.put_nowait((request, future, parts))
        return future

    def _call(self, items: list[Item]) -> list[R]:
        """The batch function over `items` (worker thread), with a text sink if any streams."""
        requests = [req for req, _, _ in items]
        sinks = [parts for _, _, parts in items]
        if not any(sinks):
            return self.run_batch(requests)

        def on_text(i: int, delta: str) -> None:
            sink = sinks[i]
            if sink is not None:
                sink.put(delta)

        return self.run_batch(requests, on_text)

    async def _next_batch(self) -> list[Item]:
        assert self.queue is not None
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_batch_size:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), timeout=left))
            except (TimeoutError, asyncio.TimeoutError):  # distinct classes on Python 3.10
                break
        return batch

    async def _work(self) -> None:
        while True:
            batch = await self._next_batch()
            live = [item for item in batch if not item[1].cancelled()]
            if not live:
                continue
            self.sizes[len(live)] += 1
            try:
                results = await asyncio.to_thread(self._call, live)
            except Exception as err:
                if len(live) == 1:
                    self._settle(live[0][1], err)
                    continue
                # one bad request must not fail the others (nor hand them its error, which may
                # carry its text): each member runs again alone and gets its own outcome
                for item in live:
                    parts = item[2]
                    if parts is not None:
                        parts.rerun()
                    try:
                        (result,) = await asyncio.to_thread(self._call, [item])
                    except Exception as alone:
                        self._settle(item[1], alone)
                    else:
                        diverged = parts is not None and parts.diverged
                        self._settle(item[1], diverged_error() if diverged else result)
                continue
            for (_, fut, _), result in zip(live, results, strict=True):
                self._settle(fut, result)

    @staticmethod
    def _settle(fut: asyncio.Future, outcome: object) -> None:
        if fut.done():  # the caller went away
            return
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)
