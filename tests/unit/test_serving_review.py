"""Findings of the code review of the hardened server (issue 20, section 2), each as a black-box
test over HTTP (the app in-process over an engine, or a real uvicorn server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from serving_fixtures import mc_engine, torch_threads

from feddpa.serving.app import AppState, Limits, LocalBackend, build_app
from feddpa.serving.engine import ServingEngine

STEM = "Route this ticket: I was charged twice for my plan"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> ServingEngine:
    return mc_engine(tmp_path_factory)


def app_client(engine: ServingEngine, limits: Limits | None = None) -> TestClient:
    return TestClient(build_app(AppState(LocalBackend(engine), None, limits or Limits())))


# --- options: the list the client sent, never re-parsed from the formatted prompt ----------------


def test_options_stay_the_list_the_client_sent(engine):
    """An option holding "\\n- x" lines was re-parsed from the formatted prompt into several: the
    answer named options the client never sent."""
    options = ["billing team\n- refund desk\n- chargebacks", "tech support"]
    with app_client(engine) as client:
        r = client.post("/v1/clients/0/predict", json={"instruction": STEM, "options": options})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["options"] == options
    assert len(body["probs"]) == 2 and body["choice"] in options


def test_option_lines_cannot_multiply_what_is_scored_past_max_options(engine, monkeypatch):
    """`max_options` counted the options as sent while the engine scored the re-parsed ones:
    4 options of 30 "- x" lines each were scored as 124. The model now scores exactly the 4."""
    scored: list[int] = []
    real = engine.model.option_probs

    def counting(examples, *args, **kwargs):
        scored.extend(len(ex.options) for ex in examples)
        return real(examples, *args, **kwargs)

    monkeypatch.setattr(engine.model, "option_probs", counting)
    options = [f"answer {i}" + "\n- x" * 30 for i in range(4)]
    limits = Limits(max_options=4, max_prompt_tokens=100_000)
    with app_client(engine, limits) as client:
        r = client.post("/v1/clients/1/predict", json={"instruction": STEM, "options": options})
        assert r.status_code == 200, r.text
        assert len(r.json()["probs"]) == 4 and r.json()["options"] == options
        five = client.post(
            "/v1/clients/1/predict", json={"instruction": STEM, "options": [*options, "more"]}
        )
    assert scored == [4]
    assert five.status_code == 413 and "the limit is 4" in five.json()["detail"]


# --- a 504 cancels the work it gave up on ----------------------------------------------------------

INFO = {"clients": [0, 1], "version": "round_00001", "kind": "multiple_choice", "problem": None}
NEVER = object()


class Response:
    """A Serve `DeploymentResponse` stand-in: settles with `value` (NEVER: not at all) and records
    `cancel()`, which is what stops the replica's work (awaiting it does not)."""

    def __init__(self, value: object = NEVER) -> None:
        self.value, self.cancelled = value, False

    async def _wait(self) -> object:
        if self.value is NEVER:
            await asyncio.Event().wait()
        return self.value

    def __await__(self):
        return self._wait().__await__()

    def cancel(self) -> None:
        self.cancelled = True


class Method:
    def __init__(self, value: object = NEVER) -> None:
        self.value, self.calls = value, []

    def remote(self, *_args) -> Response:
        self.calls.append(Response(self.value))
        return self.calls[-1]


class Handle:
    """A handle to a Personalizer that knows its clients and never answers a request."""

    def __init__(self, describe: object = INFO) -> None:
        self.describe, self.run = Method(describe), Method()


def test_a_504_cancels_the_serve_request_it_gave_up_on():
    """The ingress's timeout cancelled its own `await` only: the Serve request stayed queued and
    ran later for nobody while the error said "request cancelled"."""
    from feddpa.serving.deployment import RayBackend

    handle = Handle()
    state = AppState(RayBackend(handle), None, Limits(request_timeout_s=0.2))  # type: ignore[arg-type]
    with TestClient(build_app(state)) as client:
        r = client.post("/v1/clients/0/predict", json={"instruction": STEM, "options": ["a", "b"]})
    assert r.status_code == 504 and "request cancelled" in r.json()["detail"], r.text
    assert [call.cancelled for call in handle.run.calls] == [True]
    assert state.inflight == 0 and not state.client_inflight
