"""Ray Serve application: an HTTP ingress (the FastAPI app, built in each ingress replica) in front
of the `Personalizer` deployment, whose engine is injected. Each replica batches requests of many
clients together and holds clients' local adapters in the engine's LocalStack (LRU). Batches are
formed by our `Batcher` when the engine becomes free, not by `serve.batch`, which in Ray 2.60
forms batches eagerly while one is running (batches of 1-3 at concurrency 8, measured). Serve's
model multiplexing is not used either: in Ray 2.60 it splits batches by multiplexed model id,
which would defeat mixed-client batches."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from fastapi import FastAPI
from ray import serve
from ray.serve.config import HTTPOptions
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from feddpa.core.storage import RunDir
from feddpa.serving.app import AppState, Limits, build_app
from feddpa.serving.auth import TokenStore
from feddpa.serving.batcher import Batcher
from feddpa.serving.engine import Request, Result, ServingEngine
from feddpa.serving.errors import Failure, ServingError, failure_of, internal_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    run_dir: str
    capacity: int = 128  # clients resident per replica (LRU)
    replicas: int = 1
    max_batch_size: int = 16
    batch_wait_s: float = 0.005
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    tokens: str | None = None
    limits: Limits = Limits()


class Personalizer:
    """A model replica: the engine `make_engine` builds (in the replica: a model is never sent
    over Serve) behind a `Batcher`."""

    def __init__(
        self,
        make_engine: Callable[[], ServingEngine],
        max_batch_size: int = 16,
        batch_wait_s: float = 0.005,
    ) -> None:
        self.engine = make_engine()
        self.batcher: Batcher[Request, Result] = Batcher(
            self.engine.run_batch, max_batch_size, batch_wait_s
        )

    async def run(self, req: Request) -> Result | Failure:
        """The result, or a `Failure` returned (not raised: Ray would wrap an exception in its
        traceback). Validated alone first (loading the client into the engine's LRU), so a bad
        request fails alone and not its whole batch."""
        try:
            await asyncio.to_thread(self.engine.validate, req)
            return await self.batcher.submit(req)
        except Exception as err:
            return failure_of(err, req.request_id)

    async def stream(self, req: Request) -> AsyncGenerator[str | Result | Failure, None]:
        """`run`, streamed: the text deltas as the batch decodes them, then the result; or a
        `Failure` (first, if the request is refused), as data like `run`'s."""
        try:
            await asyncio.to_thread(self.engine.validate, req)
            async for item in self.batcher.stream(req):
                yield item
        except Exception as err:
            yield failure_of(err, req.request_id)

    def batch_sizes(self) -> dict[int, int]:
        """{batch size: batches run} so far (benchmarks, tests)."""
        return dict(self.batcher.sizes)

    def describe(self) -> dict:
        return self.engine.describe()


class RayBackend:
    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def run(self, req: Request) -> Result:
        # No multiplexed_model_id: in Ray 2.60 serve.batch splits batches by multiplexed id, which
        # would serve each client alone. The engine's LRU holds the clients instead.
        call = cast(DeploymentResponse, self.handle.run.remote(req))  # stream=False
        out = await settled(call, req.request_id)
        if isinstance(out, Failure):
            raise ServingError(out)
        return out

    async def stream(self, req: Request) -> AsyncGenerator[str | Result, None]:
        # a handle call to a generator method must be made with stream=True (Ray Serve)
        call = self.handle.options(stream=True).stream.remote(req)
        items = cast(DeploymentResponseGenerator, call)  # what stream=True returns
        finished = False
        try:
            async for item in items:
                if isinstance(item, Failure):
                    raise ServingError(item)
                yield item
            finished = True
        except ServingError:
            raise
        except Exception as err:
            raise ServingError(ray_failure(err, req.request_id)) from None
        finally:
            if not finished:
                items.cancel()  # the caller went away (or a Failure ended it): stop the replica

    async def describe(self) -> dict:
        return await settled(cast(DeploymentResponse, self.handle.describe.remote()), "describe")


async def settled(response: DeploymentResponse, request_id: str) -> Any:
    """The call's result. Cancelling an `await` of a Serve `DeploymentResponse` leaves the
    request queued in the replica, to run later for nobody (Ray 2.60: `__await__` re-raises the
    CancelledError without cancelling): a caller that gives up (the request timeout, a client gone)
    cancels the request itself, so Serve drops it from the replica's queue, or cancels the
    replica's task (`DeploymentResponse.cancel`, which the Personalizer's batcher sees as a
    cancelled future and skips). A failing call (e.g. BackPressureError, for which Serve would
    answer a bare 503) becomes the typed failure."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise
    except Exception as err:
        raise ServingError(ray_failure(err, request_id)) from None


def ray_failure(err: Exception, request_id: str) -> Failure:
    """What a client sees when the call to the Personalizer itself failed (not the request)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError

    if isinstance(err, BackPressureError):
        return Failure(503, "the model replicas' queues are full; retry later", retry=True)
    log.error("request %s: the Personalizer call failed", request_id, exc_info=err)
    if isinstance(err, ActorDiedError | ActorUnavailableError | RayActorError):
        return Failure(503, f"a model replica is restarting (request id {request_id})", True)
    return Failure(500, internal_error(request_id))


@serve.ingress()  # no app here: Serve asks each replica's __serve_build_asgi_app__ for it
class Ingress:
    """The HTTP ingress: one app per replica, over a handle to the Personalizer deployment."""

    def __init__(self, personalizer: DeploymentHandle, options: ServeOptions) -> None:
        tokens = TokenStore.load(options.tokens) if options.tokens else None
        backend = RayBackend(personalizer)
        self.state = AppState(backend, tokens, options.limits, request_id_header=False)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Called by Serve after `__init__`: this replica's app."""
        return build_app(self.state)


INGRESS_HEADROOM = 16  # ingress slots beyond max_queue: health, metrics and the 503s themselves


def queue_settings(options: ServeOptions) -> tuple[dict, dict]:
    """Serve's concurrency settings (ingress, Personalizer), consistent with the app's limits.

    The ingress admits `max_queue` + headroom requests, so the app's own check (503 with
    Retry-After once `max_queue` model requests are in flight) is reachable and cheap routes still
    get in. Serve's proxy holds at most as many again while it routes a burst (its queue is
    unbounded by default) and answers 503 itself (no Retry-After) beyond that: a queue of
    `max_queue` there refused bursts the app would have answered (measured through Serve with
    max_queue 1: six simultaneous requests got Serve's bare 503). Every Personalizer replica
    accepts what the ingress lets through (its batcher is the real queue); a call beyond its
    bounded queue is Serve's BackPressureError, which the ingress answers with 503 + Retry-After."""
    queue = options.limits.max_queue
    admitted = queue + INGRESS_HEADROOM
    ingress = {"max_ongoing_requests": admitted, "max_queued_requests": admitted}
    personalizer = {"max_ongoing_requests": queue, "max_queued_requests": queue}
    return ingress, personalizer


def engine_of(options: ServeOptions) -> Callable[[], ServingEngine]:
    """What builds a replica's engine: the run's `ServingEngine`."""
    return partial(ServingEngine, options.run_dir, options.capacity)


def build_application(options: ServeOptions):
    """The bound Serve application for `serve.run`."""
    if RunDir(options.run_dir).latest() is None:
        raise FileNotFoundError(f"{options.run_dir}: no committed training round to serve")
    ingress_queue, personalizer_queue = queue_settings(options)
    personalizer = serve.deployment(
        num_replicas=options.replicas,
        ray_actor_options={
            "num_cpus": options.cpus_per_replica,
            "num_gpus": options.gpus_per_replica,
        },
        **personalizer_queue,
    )(Personalizer).bind(engine_of(options), options.max_batch_size, options.batch_wait_s)
    ingress = serve.deployment(ray_actor_options={"num_cpus": 0.1}, **ingress_queue)(Ingress)
    return ingress.bind(personalizer, options)


APP_NAME = "feddpa"
PROXY_SLACK_S = 5.0  # the proxy's timeout is a backstop: the app answers 408 / 504 before it


def http_options(options: ServeOptions, host: str, port: int) -> dict:
    """Serve's proxy options: where it listens, and its end-to-end `request_timeout_s` (the body
    deadline + the request timeout + slack), so a request the app never answers still ends."""
    limits = options.limits
    timeout = limits.body_timeout_s + limits.request_timeout_s + PROXY_SLACK_S
    return {"host": host, "port": port, "request_timeout_s": timeout}


def check_proxy(running: HTTPOptions, wanted: dict) -> None:
    """`serve.start` on a cluster where Serve already runs keeps the running proxy's HTTP options
    without a word: refuse when they are not the ones asked for (the exposure check trusted
    --host, while the proxy may listen on 0.0.0.0)."""
    if (running.host, running.port) != (wanted["host"], wanted["port"]):
        raise ValueError(
            f"Ray Serve already runs on this cluster with its HTTP proxy on "
            f"{running.host}:{running.port}, and keeps it: this app would be served there, not on "
            f"{wanted['host']}:{wanted['port']}. Pass --host {running.host} --port {running.port} "
            "(the exposure check then applies to that address), or stop the running Serve first "
            "(`serve shutdown`)"
        )
    if running.request_timeout_s != wanted["request_timeout_s"]:
        log.warning(
            "the running Serve proxy keeps its request timeout of %s s (this app asked for %s s)",
            running.request_timeout_s,
            wanted["request_timeout_s"],
        )


def start(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False):
    """Start Serve's HTTP proxy on host:port (or join the running one if its options are the
    same) and deploy the app; returns the app handle."""
    from ray.serve.context import _get_global_client  # Serve's own client: its running options

    wanted = http_options(options, host, port)
    serve.start(http_options=wanted)
    client = _get_global_client()
    assert client is not None  # serve.start connected it
    check_proxy(client.http_config, wanted)
    return serve.run(build_application(options), name=APP_NAME, route_prefix="/", blocking=blocking)
