"""The serving replica's opportunistic batcher (pure asyncio, no Ray)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from feddpa.serving.batcher import Batcher


def slow_echo(seconds: float, calls: list[list[int]]):
    def run(batch: list[int]) -> list[int]:
        calls.append(list(batch))
        time.sleep(seconds)
        return [x * 10 for x in batch]

    return run


def test_requests_arriving_during_a_batch_all_join_the_next_one():
    calls: list[list[int]] = []
    batcher = Batcher(slow_echo(0.2, calls), max_batch_size=16, wait_s=0.005)

    async def main() -> list[int]:
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.05)  # batch [0] is running
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 10)]
        return await asyncio.gather(first, *rest)

    assert asyncio.run(main()) == [i * 10 for i in range(10)]
    assert calls == [[0], list(range(1, 10))]
    assert batcher.sizes == {1: 1, 9: 1}


def test_batches_respect_the_maximum_size():
    calls: list[list[int]] = []
    batcher = Batcher(slow_echo(0.0, calls), max_batch_size=4, wait_s=0.05)

    async def main() -> list[int]:
        return await asyncio.gather(*(batcher.submit(i) for i in range(10)))

    assert asyncio.run(main()) == [i * 10 for i in range(10)]
    assert [len(c) for c in calls] == [4, 4, 2]


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on():
    def run(batch: list[int]) -> list[int]:
        if 13 in batch:
            raise ValueError("bad item 13")
        return batch

    batcher = Batcher(run, max_batch_size=8, wait_s=0.0)

    async def main():
        with pytest.raises(ValueError, match="bad item 13"):
            await batcher.submit(13)
        return await batcher.submit(7)

    assert asyncio.run(main()) == 7


def test_the_batch_runs_off_the_event_loop():
    loop_thread: list[int] = []
    batch_thread: list[int] = []

    def run(batch: list[int]) -> list[int]:
        batch_thread.append(threading.get_ident())
        return batch

    async def main():
        loop_thread.append(threading.get_ident())
        return await Batcher(run, 2, 0.0).submit(1)

    assert asyncio.run(main()) == 1
    assert batch_thread[0] != loop_thread[0]


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(lambda b: b, 0, 0.0)


def test_one_bad_request_fails_alone_inside_a_batch():
    """A batch that raises is run again member by member: only the culprit fails, with its own
    error, and the others get their results (before, all of them got the culprit's exception)."""
    calls: list[list[int]] = []

    def run(batch: list[int]) -> list[int]:
        calls.append(list(batch))
        time.sleep(0.05)
        if 13 in batch:
            raise ValueError("bad item 13")
        return [x * 10 for x in batch]

    batcher = Batcher(run, max_batch_size=8, wait_s=0.05)

    async def main():
        tasks = [asyncio.create_task(batcher.submit(i)) for i in (1, 13, 2)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    one, bad, two = asyncio.run(main())
    assert (one, two) == (10, 20)
    assert isinstance(bad, ValueError) and "13" in str(bad)
    assert calls[0] == [1, 13, 2] and sorted(map(tuple, calls[1:])) == [(1,), (2,), (13,)]


def test_a_lone_request_waits_for_company_then_runs_on_python_3_10_too(monkeypatch):
    """The wait for company ends in a timeout: on Python 3.10 `asyncio.wait_for` raises
    `asyncio.TimeoutError`, a class of its own there (an alias of the built-in one from 3.11). A
    batcher catching only the built-in class let it kill the worker: the request hung. The 3.10
    class is emulated here, so the check runs on any Python."""

    class TimeoutError310(Exception):  # asyncio.exceptions.TimeoutError on 3.10
        pass

    async def wait_for_310(awaitable, timeout):
        task = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if task in done:
            return task.result()
        task.cancel()
        raise TimeoutError310

    monkeypatch.setattr(asyncio, "TimeoutError", TimeoutError310)
    monkeypatch.setattr(asyncio, "wait_for", wait_for_310)
    calls: list[list[int]] = []
    batcher = Batcher(slow_echo(0.0, calls), max_batch_size=4, wait_s=0.01)

    async def main():
        task = asyncio.ensure_future(batcher.submit(7))
        await asyncio.wait({task}, timeout=30)  # a liveness guard, not a timing assertion
        assert task.done(), "the lone request hung: the worker died on the timeout"
        return task.result()

    assert asyncio.run(main()) == 70
    assert calls == [[7]]
