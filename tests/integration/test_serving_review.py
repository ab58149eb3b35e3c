"""Findings of the code review of the hardened server (issue 20, section 2), each as a black-box
test over HTTP (the app in-process over an engine, or a real uvicorn server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import gc
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
import pytest
import uvicorn
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from serving_fixtures import commit_scaled_global, free_port, mc_engine, mc_run, torch_threads

from feddpa.core.records import Example
from feddpa.core.storage import Round, RunDir
from feddpa.core.weighting import ClientBank
from feddpa.serving.app import AppState, Limits, LocalBackend, build_app
from feddpa.serving.auth import TokenStore, create_tokens
from feddpa.serving.engine import Request, ServingEngine

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


# --- --capacity bounds what is resident; a round switch does not stall batches --------------------


def items() -> list[Request]:
    return [
        Request(cid, Example.multiple_choice(STEM, ["billing team", "tech support"], "r"))
        for cid in (0, 1, 2, 3)
    ]


def test_more_distinct_clients_than_capacity_stay_within_it(tmp_path_factory, engine):
    """Clients were loaded before eviction, the local-adapter stack doubled past the capacity and
    every client's bank stayed in memory. Now a batch of 4 clients at capacity 2 runs in parts:
    never more than 2 clients resident, 2 stack slots, 2 banks held; answers unchanged."""
    requests = items() + items()[:1]
    want = engine.run_batch(requests)  # the shared engine (capacity 128) loads its banks first
    gc.collect()
    banks_before = sum(isinstance(o, ClientBank) for o in gc.get_objects())
    small = ServingEngine(mc_run(tmp_path_factory), capacity=2)
    peak = 0
    real_put = small.stack.put

    def put(state, owner="adapter"):
        nonlocal peak
        peak = max(peak, len(small.slots) + 1)
        return real_put(state, owner)

    small.stack.put = put  # type: ignore[method-assign]
    got = small.run_batch(requests)
    for a, b in zip(got, want, strict=True):
        assert a.probs == pytest.approx(b.probs, abs=1e-5) and a.choice == b.choice
    assert peak <= 2 and len(small.slots) <= 2 and small.stack.capacity <= 2
    gc.collect()
    assert sum(isinstance(o, ClientBank) for o in gc.get_objects()) - banks_before <= 2


def test_a_batch_completes_while_a_new_round_is_read(tmp_path_factory, tmp_path, monkeypatch):
    """The new round was read under the engine's lock: every batch waited for the whole read."""
    copy = tmp_path / "run"
    shutil.copytree(mc_run(tmp_path_factory), copy)
    live = ServingEngine(copy)
    request = items()[:1]
    live.run_batch(request)
    commit_scaled_global(copy, 3.0)
    reading, release = threading.Event(), threading.Event()
    real = live._read_round

    def slow_read(source):
        reading.set()
        release.wait(timeout=60)
        return real(source)

    monkeypatch.setattr(live, "_read_round", slow_read)
    switcher = threading.Thread(target=live.refresh)
    switcher.start()
    done: list = []
    batch = threading.Thread(target=lambda: done.extend(live.run_batch(request)))
    try:
        assert reading.wait(timeout=10)
        batch.start()
        batch.join(timeout=20)
        assert done and done[0].version == "round_00001", "the batch waited for the round read"
    finally:
        release.set()
        switcher.join(timeout=60)
        if batch.ident is not None:
            batch.join(timeout=60)
    assert live.run_batch(request)[0].version == "round_00002"


# --- server-side faults: a 503 naming no path; a NaN local adapter is never served ---------------


def _replace(file: Path, write) -> None:
    """Rewrite `file` as a new file (rounds share files through hard links)."""
    tensors = load_file(str(file))
    file.unlink()
    write(file, tensors)


def test_a_new_round_with_a_nan_local_adapter_is_not_served(tmp_path_factory, tmp_path):
    """Only the global adapter was checked for NaN: a NaN local adapter was served (probs null,
    the first option chosen). Now the round is refused, the previous one stays, and `/healthz`
    says why without a server path."""
    copy = tmp_path / "run"
    shutil.copytree(mc_run(tmp_path_factory), copy)
    live = ServingEngine(copy)
    new_round = Round(commit_scaled_global(copy, 3.0))
    local = new_round.client(2).local_file
    _replace(local, lambda f, t: save_file({k: v * float("nan") for k, v in t.items()}, str(f)))
    body = {"instruction": STEM, "options": ["billing team", "tech support"]}
    with app_client(live) as client:
        r = client.post("/v1/clients/2/predict", json=body)
        health = client.get("/healthz").json()
    assert r.status_code == 200 and r.json()["version"] == "round_00001", r.text
    assert all(p == p for p in r.json()["probs"])  # no NaN (JSON null)
    assert health["status"] == "degraded" and "NaN" in health["reason"], health
    assert str(tmp_path) not in health["reason"] and "round_00002" in health["reason"]


def test_a_corrupt_adapter_on_the_server_is_a_503_naming_no_path(tmp_path_factory, tmp_path):
    """A server-side `ValueError` (an unreadable adapter) was a 422 naming a server path."""
    copy = tmp_path / "run"
    shutil.copytree(mc_run(tmp_path_factory), copy)
    live = ServingEngine(copy)
    local = RunDir(copy).latest().client(3).local_file  # type: ignore[union-attr]
    local.unlink()
    local.write_bytes(b"not safetensors")
    with app_client(live) as client:
        r = client.post("/v1/clients/3/predict", json={"instruction": STEM, "options": ["a", "b"]})
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert str(tmp_path) not in r.text and "client 3" in r.json()["detail"]


# --- a rerun stream never splices other text onto what was sent ---------------------------------


def _diverging_batch(requests: list[str], on_text=None) -> list[str]:
    """With "bad" in the batch: every row streams 2 characters, then the batch fails. Alone a
    row decodes other text ("beta!" for "alpha"), as a lone row may decode unlike a batch."""
    if "bad" in requests:
        if on_text is not None and len(requests) > 1:
            for i, req in enumerate(requests):
                on_text(i, req[:2])
        raise ValueError("bad request")
    texts = ["beta!" if req == "alpha" else req + "!" for req in requests]
    for i, text in enumerate(texts):
        if on_text is not None:
            on_text(i, text[:2])
            on_text(i, text[2:])
    return texts


def test_a_rerun_that_decodes_other_text_ends_the_stream_with_an_error():
    """A failed batch's rerun passed on its text from the old length: "al" + "ta!" = "alta!"."""
    from feddpa.serving.batcher import Batcher
    from feddpa.serving.errors import Unavailable

    async def scenario():
        batcher = Batcher(_diverging_batch, max_batch_size=8, wait_s=0.05)

        async def collect(req: str) -> list[str]:
            out = []
            try:
                async for item in batcher.stream(req):
                    out.append(item)
            except (ValueError, Unavailable) as err:
                out.append(f"{type(err).__name__}: {err}")
            return out

        return await asyncio.gather(collect("alpha"), collect("bad"))

    alpha, bad = asyncio.run(scenario())
    assert alpha[0] == "al" and len(alpha) == 2, alpha
    assert alpha[1].startswith("Diverged: the batch failed after this stream had started"), alpha
    assert bad == ["ba", "ValueError: bad request"]
