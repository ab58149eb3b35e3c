"""The Ray Serve application over HTTP on 127.0.0.1: concurrent requests of several clients equal
the in-process engine, the unmodified `openai` client works against it, and bearer tokens scope
every client."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx2
import openai
import pytest
import torch
from serving_fixtures import (
    Reference,
    causal_engine,
    causal_run,
    commit_scaled_global,
    free_port,
    mc_engine,
    mc_run,
    torch_threads,
)

from feddpa.core.records import Example, format_options
from feddpa.serving.auth import create_tokens
from feddpa.serving.engine import Request

pytestmark = pytest.mark.ray

ITEMS = [
    ("Route this ticket: I was charged twice", ["billing team", "tech support", "logistics"]),
    ("Is this review positive? A dull, endless film", ["positive", "negative"]),
    ("Which class is a salmon?", ["mammal", "bird", "fish", "insect"]),
]


@dataclass(frozen=True)
class Served:
    url: str
    tokens: dict
    run_dir: Path


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory) -> Iterator[Served]:
    from ray import serve

    from feddpa.serving.deployment import ServeOptions, start

    run_dir = tmp_path_factory.mktemp("served") / "run"  # a copy: the roll-out test commits to it
    shutil.copytree(mc_run(tmp_path_factory), run_dir)
    tokens_file = tmp_path_factory.mktemp("serve_tokens") / "tokens.json"
    tokens = create_tokens([0, 1, 2, 3], tokens_file)
    port = free_port()
    options = ServeOptions(
        run_dir=str(run_dir), cpus_per_replica=0.5, tokens=str(tokens_file), batch_wait_s=0.05
    )
    try:
        start(options, host="127.0.0.1", port=port)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx2.get(f"{url}/healthz", timeout=10).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            assert time.monotonic() < deadline, "the Serve app did not become healthy in 60 s"
            time.sleep(0.5)
        yield Served(url, tokens, run_dir)
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with torch_threads(1):
        yield mc_engine(tmp_path_factory)


def in_process(engine, cid: int, stem: str, options: list[str]):
    example = Example(format_options(stem, options), options[0], "request")
    with torch_threads(1):
        return engine.run_batch([Request(cid, example)])[0]


def predict(url: str, token: str, cid: int, stem: str, options: list[str]) -> httpx2.Response:
    return httpx2.post(
        f"{url}/v1/clients/{cid}/predict",
        json={"instruction": stem, "options": options},
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )


def test_concurrent_predictions_of_two_clients_equal_the_engine(served, engine):
    jobs = [(cid, stem, opts) for cid in (1, 2) for stem, opts in ITEMS]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        responses = list(
            pool.map(lambda job: predict(served.url, served.tokens["admin"], *job), jobs)
        )
    for (cid, stem, opts), r in zip(jobs, responses, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        want = in_process(engine, cid, stem, opts)
        assert body["client_id"] == cid and body["options"] == opts
        assert body["version"] == want.version == "round_00001"
        torch.testing.assert_close(
            torch.tensor(body["probs"]), torch.tensor(want.probs), rtol=0, atol=1e-5
        )
        assert body["choice"] == want.choice
        assert body["weights"]["global_adapter"] == pytest.approx(want.global_weight, abs=1e-6)


def test_openai_client_against_serve(served, engine):
    oa = openai.OpenAI(
        base_url=f"{served.url}/v1", api_key=served.tokens["clients"]["2"], max_retries=0
    )
    stem, opts = ITEMS[0]
    want = in_process(engine, 2, stem, opts).choice
    completion = oa.completions.create(model="client-2", prompt=format_options(stem, opts))
    assert completion.choices[0].text == want
    chat = oa.chat.completions.create(
        model="client-2", messages=[{"role": "user", "content": format_options(stem, opts)}]
    )
    assert chat.choices[0].message.content == want
    assert [m.id for m in oa.models.list()] == ["client-2"]
    with pytest.raises(openai.PermissionDeniedError):
        oa.completions.create(model="client-1", prompt=format_options(stem, opts))


def test_client_token_opens_its_own_client_only(served):
    stem, opts = ITEMS[1]
    own = served.tokens["clients"]["1"]
    assert predict(served.url, own, 1, stem, opts).status_code == 200
    r = predict(served.url, own, 2, stem, opts)
    assert r.status_code == 403 and "client 1 only" in r.json()["detail"]
    assert predict(served.url, "not-a-token", 1, stem, opts).status_code == 401
    r = httpx2.post(
        f"{served.url}/v1/clients/1/predict", json={"instruction": stem, "options": opts}
    )
    assert r.status_code == 401
    r = httpx2.get(f"{served.url}/v1/clients", headers={"Authorization": f"Bearer {own}"})
    assert [c["client_id"] for c in r.json()["clients"]] == [1]
    assert predict(served.url, served.tokens["admin"], 7, stem, opts).status_code == 404


def test_errors_raised_in_the_replica_reach_the_client_as_plain_json(served):
    """An error inside the Personalizer (here its prompt-token limit) used to arrive as a Ray
    traceback (`ray::ServeReplica...`, colour codes, actor ids); now the documented JSON error."""
    stem, opts = "word " * 1500, ["yes", "no"]  # under the character limit, over 1024 tokens
    r = predict(served.url, served.tokens["admin"], 1, stem, opts)
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["detail"].startswith("prompt has") and "the limit is 1024" in body["detail"]
    assert body["request_id"] == r.headers["x-request-id"]
    assert "ray::" not in r.text and "\\u001b" not in r.text and "actor_id" not in r.text


def test_joining_a_running_serve_with_other_http_options_is_refused(served):
    """`serve.start` on a running Serve keeps its proxy's HTTP options without a word: the app
    was deployed on the running proxy's address while the exposure check trusted --host."""
    from feddpa.serving.deployment import ServeOptions, start

    elsewhere = free_port()
    with pytest.raises(ValueError, match=f"proxy on 127.0.0.1:{served.url.rsplit(':', 1)[1]}"):
        start(ServeOptions(run_dir=str(served.run_dir)), host="127.0.0.1", port=elsewhere)
    assert httpx2.get(f"{served.url}/healthz", timeout=10).status_code == 200  # untouched


@pytest.fixture(scope="module")
def served_causal(served, tmp_path_factory, tiny_llama_dir) -> Iterator[str]:
    """The causal-LM run as a second application under /causal on the same Serve proxy."""
    from ray import serve

    from feddpa.serving.deployment import ServeOptions, build_application
    from feddpa.serving.limits import Limits

    run_dir = causal_run(tmp_path_factory, tiny_llama_dir)
    # one request in flight at a time: the backpressure test fills the queue with two
    options = ServeOptions(run_dir=str(run_dir), cpus_per_replica=0.5, limits=Limits(max_queue=1))
    serve.run(build_application(options), name="causal", route_prefix="/causal")
    url = f"{served.url}/causal"
    deadline = time.monotonic() + 60
    while httpx2.get(f"{url}/healthz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the causal app did not become healthy in 60 s"
        time.sleep(0.5)
    try:
        yield url
    finally:
        serve.delete("causal")


def test_openai_client_streams_through_serve(served_causal, tmp_path_factory, tiny_llama_dir):
    """`stream=True` through the proxy, the ingress and a streaming handle call to the
    Personalizer (`handle.options(stream=True)`): the deltas join to the engine's text."""
    prompt = "Tell me about the weather"
    engine = causal_engine(tmp_path_factory, tiny_llama_dir)
    with torch_threads(1):
        want = engine.run_batch([Request(1, Example(prompt, "", "r"), "generate", None, 5)])[0]
    oa = openai.OpenAI(base_url=f"{served_causal}/v1", api_key="unused", max_retries=0)
    parts = list(oa.completions.create(model="client-1", prompt=prompt, max_tokens=5, stream=True))
    assert len(parts) > 2 and {p.object for p in parts} == {"text_completion"}
    assert "".join(p.choices[0].text for p in parts) == want.text
    assert parts[-1].choices[0].finish_reason == "length"
    chunks = list(
        oa.chat.completions.create(
            model="client-1",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    with pytest.raises(openai.NotFoundError):  # refused before the stream starts
        oa.completions.create(model="client-7", prompt=prompt, stream=True)


OVERLOADED = {"overloaded, retry later", "the model replicas' queues are full; retry later"}


def test_a_full_queue_is_503_with_retry_after_through_serve(served_causal):
    """Backpressure through the proxy: with `max_queue=1`, requests sent together while one
    generates (200 tokens) are refused at once with 503 + Retry-After, never queued without
    bound, and the admitted one completes. Released together behind a barrier, the refused ones
    arrive while the first is still decoding (its 200 steps take far longer than a thread start)."""
    barrier = threading.Barrier(6)

    def generate(_: int) -> httpx2.Response:
        barrier.wait()
        return httpx2.post(
            f"{served_causal}/v1/clients/1/generate",
            json={"prompt": "Tell me a long story about the sea", "max_tokens": 200},
            timeout=120,
        )

    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(generate, range(6)))
    codes = [r.status_code for r in responses]
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    for r in responses:
        if r.status_code == 503:
            assert r.headers.get("retry-after") == "1", (r.text, dict(r.headers))
            # refused by the ingress's count, or by the Personalizer's bounded Serve queue
            assert r.json()["detail"] in OVERLOADED, r.text


@pytest.fixture
def served_slow(served, tmp_path_factory, tiny_llama_dir) -> Iterator[str]:
    """The causal-LM run under /slow: one request per batch and a 0.25 s request timeout, so a
    burst of long generations times out while queued in the Personalizer."""
    from ray import serve

    from feddpa.serving.deployment import ServeOptions, build_application
    from feddpa.serving.limits import Limits

    options = ServeOptions(
        run_dir=str(causal_run(tmp_path_factory, tiny_llama_dir)),
        cpus_per_replica=0.5,
        max_batch_size=1,
        limits=Limits(request_timeout_s=0.25),
    )
    serve.run(build_application(options), name="slow", route_prefix="/slow")
    url = f"{served.url}/slow"
    deadline = time.monotonic() + 60
    while httpx2.get(f"{url}/healthz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the slow app did not become healthy in 60 s"
        time.sleep(0.5)
    try:
        yield url
    finally:
        serve.delete("slow")


def test_timed_out_requests_leave_no_orphans_in_the_personalizer(served_slow):
    """A 504 used to cancel the ingress's `await` only: each timed-out request stayed queued in the
    Personalizer and ran later for nobody, ahead of fresh requests. Now the Serve request is
    cancelled: of 8 timed-out generations at most the one running at the time is decoded, and a
    fresh request after them runs next."""
    from ray import serve

    def generate(tokens: int) -> httpx2.Response:
        return httpx2.post(
            f"{served_slow}/v1/clients/1/generate",
            json={"prompt": "Tell me a long story about the sea", "max_tokens": tokens},
            timeout=120,
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = [r.status_code for r in pool.map(generate, [250] * 8)]
    assert set(codes) <= {200, 504} and codes.count(504) >= 4, codes
    # a fresh short request waits at most for the generation still running (a running batch
    # cannot be stopped); before the fix it queued behind every orphan and kept timing out
    attempts, deadline = 1, time.monotonic() + 60
    while (fresh := generate(2)).status_code == 504 and time.monotonic() < deadline:
        attempts += 1
        time.sleep(0.2)
    assert fresh.status_code == 200, fresh.text
    replica = serve.get_deployment_handle("Personalizer", app_name="slow")
    batches = sum(replica.batch_sizes.remote().result().values())
    # the answered ones, at most two running when the others timed out, and the fresh ones
    assert batches <= codes.count(200) + 2 + attempts, (batches, attempts, codes)


def test_roll_out_under_load_fails_no_request_and_mixes_no_versions(served):
    """Runs last (it commits round 2 into the served run): 4 threads keep predicting while the
    round is committed. Every response is 200, each thread sees the old round and then only the
    new one, and every answer equals the in-process result of the round it reports."""
    items = [(cid, *ITEMS[cid % len(ITEMS)]) for cid in range(4)]
    old = Reference(served.run_dir)
    seen: dict[int, list[tuple[str, list[float]]]] = {cid: [] for cid, _, _ in items}
    failures: list[str] = []
    committed = threading.Event()

    def worker(cid: int, stem: str, opts: list[str]) -> None:
        deadline = time.monotonic() + 120
        new_seen = 0
        while time.monotonic() < deadline and new_seen < 3:
            r = predict(served.url, served.tokens["admin"], cid, stem, opts)
            if r.status_code != 200:
                failures.append(f"client {cid}: HTTP {r.status_code} {r.text[:200]}")
                return
            body = r.json()
            seen[cid].append((body["version"], body["probs"]))
            new_seen += committed.is_set() and body["version"] == "round_00002"

    threads = [threading.Thread(target=worker, args=item) for item in items]
    for t in threads:
        t.start()
    time.sleep(1.0)  # requests in flight on the old round
    with torch_threads(1):
        new_round = commit_scaled_global(served.run_dir, 3.0)
    committed.set()
    for t in threads:
        t.join(timeout=150)
    assert not failures, failures
    new = Reference(served.run_dir, new_round)
    for cid, stem, opts in items:
        versions = [v for v, _ in seen[cid]]
        assert versions[0] == "round_00001" and versions[-1] == "round_00002", versions
        switch = versions.index("round_00002")
        assert set(versions[switch:]) == {"round_00002"}, versions  # never back to the old round
        example = Example(format_options(stem, opts), opts[0], "request")
        with torch_threads(1):
            want = {
                "round_00001": old.probs(cid, example)[0],
                "round_00002": new.probs(cid, example)[0],
            }
        for version, probs in seen[cid]:
            torch.testing.assert_close(torch.tensor(probs), want[version], rtol=0, atol=1e-5)
