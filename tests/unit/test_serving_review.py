"""Findings of the code review of the hardened server (issue 20, section 2), each as a black-box
test over HTTP (the app in-process over an engine, or a real uvicorn server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx2
import pytest
import uvicorn
from fastapi.testclient import TestClient
from serving_fixtures import free_port, mc_engine, torch_threads

from feddpa.serving.app import AppState, Limits, LocalBackend, build_app
from feddpa.serving.auth import TokenStore, create_tokens
from feddpa.serving.engine import ServingEngine

STEM = "Route this ticket: I was charged twice for my plan"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> ServingEngine:
    return mc_engine(tmp_path_factory)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


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


# --- slow bodies: a deadline, a per-token cap, a bounded client-list call ------------------------


@contextmanager
def listening(app) -> Iterator[int]:
    """`app` under uvicorn on 127.0.0.1 (a real server: a body can trickle in); yields the port."""
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield config.port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def slow_upload(port: int, token: str, sent: bytes, length: int) -> socket.socket:
    """A predict request whose body stops after `sent` (of `length` declared bytes)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    head = (
        "POST /v1/clients/0/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )
    sock.sendall(head.encode() + sent)
    return sock


def status_of(sock: socket.socket) -> int:
    """The status of the response on `sock` (socket.timeout if none comes)."""
    first = sock.recv(4096).split(b"\r\n", 1)[0]  # b"HTTP/1.1 408 Request Timeout"
    return int(first.split()[1])


@pytest.mark.timeout(60)  # before the fix it waited without end
def test_a_body_that_trickles_in_is_refused_at_the_body_deadline(engine):
    """A request held its slot while its body trickled in, for as long as the client liked."""
    app = build_app(AppState(LocalBackend(engine), None, Limits(body_timeout_s=0.5)))
    with listening(app) as port:
        sock = slow_upload(port, "none", b'{"instruction": "Route', 200)
        started = time.monotonic()
        with sock:
            assert status_of(sock) == 408
        assert time.monotonic() - started < 4


@pytest.mark.timeout(60)  # before the fix it waited without end
def test_one_tokens_slow_uploads_cannot_take_every_slot(engine, tmp_path):
    """The per-client count started after the body was parsed: one token's slow uploads held
    every slot. Now a client token has at most `max_token_connections` requests open (uploads
    included): its next one is a 429 at once, and another client is served."""
    tokens = create_tokens([0, 1], tmp_path / "tokens.json")
    limits = Limits(max_token_connections=2, body_timeout_s=30)
    app = build_app(
        AppState(LocalBackend(engine), TokenStore.load(tmp_path / "tokens.json"), limits)
    )
    body = {"instruction": STEM, "options": ["billing team", "tech support"]}
    with listening(app) as port:
        url, own = f"http://127.0.0.1:{port}/v1/clients", tokens["clients"]["0"]
        held = [slow_upload(port, own, b'{"instruction"', 100) for _ in range(2)]
        time.sleep(0.2)  # both uploads have reached the app
        try:
            third = httpx2.post(f"{url}/0/predict", json=body, headers=bearer(own), timeout=5)
            other = httpx2.post(
                f"{url}/1/predict", json=body, headers=bearer(tokens["clients"]["1"]), timeout=30
            )
        finally:
            for sock in held:
                sock.close()
        assert third.status_code == 429 and third.headers["retry-after"] == "1", third.text
        assert "client 0" in third.json()["detail"] and "limit is 2" in third.json()["detail"]
        assert other.status_code == 200, other.text
        deadline = time.monotonic() + 10  # the closed uploads give their places back
        while (
            again := httpx2.post(f"{url}/0/predict", json=body, headers=bearer(own), timeout=30)
        ).status_code == 429:
            assert time.monotonic() < deadline, again.text
            time.sleep(0.1)
        assert again.status_code == 200, again.text


def test_health_checks_do_not_call_the_backend_per_request():
    """Every `/healthz` (public) called the Personalizer, which read the run's LATEST round."""

    class Counting:
        calls = 0

        async def describe(self) -> dict:
            Counting.calls += 1
            return INFO

    with TestClient(build_app(AppState(Counting()))) as client:  # type: ignore[arg-type]
        for _ in range(20):
            assert client.get("/healthz").status_code == 200
    assert Counting.calls == 1


@pytest.mark.timeout(60)  # before the fix it waited without end
def test_a_client_list_call_that_never_answers_is_a_503_not_a_held_slot():
    state = AppState(RayBackend_of(Handle(describe=NEVER)), None, Limits(request_timeout_s=0.3))
    with TestClient(build_app(state)) as client:
        r = client.get("/v1/clients")
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert "did not list the clients" in r.json()["detail"]


def RayBackend_of(handle: Handle):  # noqa: N802 - reads as the class it builds
    from feddpa.serving.deployment import RayBackend

    return RayBackend(handle)  # type: ignore[arg-type]


# --- `feddpa serve` ends on SIGTERM -----------------------------------------------------------------

SERVE_UNTIL_SIGTERM = """
import os, signal, sys
from ray import serve
import feddpa.orchestrator.driver as driver
import feddpa.serving.deployment as deployment
from feddpa import cli

driver.init_ray = lambda address: None  # no Ray: what is checked is what happens on SIGTERM
deployment.start = lambda options, host, port: print("started", flush=True)
serve.delete = lambda name: print("deleted", name, flush=True)
serve.shutdown = lambda: print("shut down", flush=True)
cli.time.sleep = lambda s: os.kill(os.getpid(), signal.SIGTERM)  # `ray job stop`
sys.exit(cli.main(["serve", sys.argv[1], "--port", "8123"]))
"""


def test_sigterm_deletes_the_app_and_exits(tmp_path):
    """SIGTERM (`ray job stop`) killed `feddpa serve` at once, leaving its app deployed."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", SERVE_UNTIL_SIGTERM, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    lines = done.stdout.splitlines()
    assert lines[0] == "started" and lines[-2:] == ["deleted feddpa", "shut down"], done.stdout
