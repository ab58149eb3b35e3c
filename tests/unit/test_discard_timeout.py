"""`RayExecutor.discard` is bounded by the round timeout (issue 20, section 2): a hung actor is
killed and restarted (it re-reads every client from the committed round), never waited for."""

from __future__ import annotations

import time

import pytest

from feddpa.core.config import build_config


@pytest.mark.timeout(60)  # before the fix the call waited without end
def test_discard_does_not_wait_forever_for_a_hung_actor(monkeypatch):
    import ray
    from ray.exceptions import GetTimeoutError

    from feddpa.orchestrator.ray_executor import RayExecutor

    class Method:
        @staticmethod
        def remote(cid: int) -> str:
            return f"ref-{cid}"

    class HungActor:
        discard = Method()

    def get(ref, timeout=None):
        if timeout is None:
            time.sleep(3600)  # the actor never answers
        raise GetTimeoutError(f"{ref} not ready after {timeout} s")

    killed: list = []
    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart: killed.append((actor, no_restart)))
    actor = HungActor()
    executor = object.__new__(RayExecutor)  # no Ray: the actors are stand-ins
    executor.cfg = build_config({"ray": {"round_timeout_s": 5}})
    executor.actors, executor.owner, executor.suspects = [actor], {3: actor}, set()
    executor.discard([3])
    assert killed == [(actor, False)] and executor.suspects == {0}
