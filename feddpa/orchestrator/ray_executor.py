"""Client work over Ray actors: clients are spread over `num_actors` actors (each loads the base
model once); per round the global adapter is put in the object store once, every sampled client's
`fit` is submitted to its actor, and results are yielded as they complete (`ray.wait`), so the
driver folds them into the running FedAvg with memory independent of the number of clients.
A client whose actor dies, or that misses the round timeout, is reported as failed."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator

import numpy as np
import ray
from ray.exceptions import (
    ActorDiedError,
    GetTimeoutError,
    ObjectLostError,
    RayActorError,
    RayTaskError,
)

from feddpa.actors.host import FitResult
from feddpa.actors.ray_actor import client_actor_class, from_wire, to_wire
from feddpa.core.algorithms import method_of
from feddpa.core.config import ExperimentConfig
from feddpa.core.evaluation import ItemScores
from feddpa.core.storage import RunDir

log = logging.getLogger(__name__)


def actor_count(cfg: ExperimentConfig, num_clients: int) -> int:
    if cfg.ray.num_actors:
        return min(cfg.ray.num_actors, num_clients)
    cpus = ray.available_resources().get("CPU", 1.0) - cfg.ray.driver_cpus
    by_cpu = max(1, math.floor(cpus / cfg.ray.cpus_per_actor))
    if cfg.ray.gpus_per_actor:
        gpus = ray.available_resources().get("GPU", 0.0)
        by_cpu = min(by_cpu, max(1, math.floor(gpus / cfg.ray.gpus_per_actor)))
    return max(1, min(num_clients, by_cpu))


def assign(client_ids: list[int], n_actors: int) -> list[list[int]]:
    """Contiguous near-equal blocks of clients per actor."""
    per = math.ceil(len(client_ids) / n_actors)
    return [client_ids[i : i + per] for i in range(0, len(client_ids), per)]


class RayExecutor:
    def __init__(
        self, cfg: ExperimentConfig, data_dir: str, client_ids: list[int], run: RunDir
    ) -> None:
        self.cfg = cfg
        ids = method_of(cfg).hosted_clients(client_ids)
        actor_cls = client_actor_class(cfg)
        self.blocks = assign(ids, actor_count(cfg, len(ids)))
        self.actors = [actor_cls.remote(cfg, data_dir, block, run) for block in self.blocks]
        self.owner = {cid: self.actors[i] for i, block in enumerate(self.blocks) for cid in block}
        self.failures: list[dict] = []
        self.suspects: set[int] = set()  # actors that failed a call: maybe restarting
        self.transfer_s = 0.0  # time spent fetching results into the driver
        self.progress = {"step": -1, "done": 0, "sampled": 0, "failed": 0}
        log.info("%d client actors for %d clients", len(self.actors), len(ids))

    def _gather(self, pending: dict, step: int, what: str) -> Iterator:
        deadline = time.monotonic() + self.cfg.ray.round_timeout_s
        self.progress.update(step=step, done=0, sampled=len(pending), failed=0)
        while pending:
            left = deadline - time.monotonic()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(left, 0))
            if not ready:
                self._kill_late(pending, step, what)
                return
            ref = ready[0]
            cid = pending.pop(ref)
            try:
                t0 = time.perf_counter()
                value = ray.get(ref)
                self.transfer_s += time.perf_counter() - t0
                self.progress["done"] += 1
                yield value
            except (RayActorError, RayTaskError, GetTimeoutError, ObjectLostError) as err:
                self._fail(step, cid, what, f"{type(err).__name__}: {str(err).splitlines()[0]}")

    def _kill_late(self, pending: dict, step: int, what: str) -> None:
        """The round timed out: kill (and let Ray restart) every actor still running one of its
        calls. `ray.cancel` cannot stop a running synchronous actor task, and a late client would
        go on changing its state and writing into the stage; a restarted host re-reads its
        clients from the run directory."""
        late = {self.actors.index(self.owner[cid]) for cid in pending.values()}
        for idx in sorted(late):
            log.warning(
                "round %d: killing client actor %d (round timeout); Ray restarts it", step, idx
            )
            ray.kill(self.actors[idx], no_restart=False)
        for cid in pending.values():
            self._fail(step, cid, what, "round timeout: its actor was killed")

    def discard(self, client_ids: list[int]) -> None:
        """Drop clients' cached state in their actors, each call bounded by the round timeout: an
        actor that does not answer is killed and restarted (as a late one is), since a restarted
        actor re-reads every client from the committed round anyway."""
        for cid in client_ids:
            actor = self.owner[cid]
            try:
                ray.get(actor.discard.remote(cid), timeout=self.cfg.ray.round_timeout_s)
            except GetTimeoutError:
                log.error("client %d: discard timed out; killing its actor (Ray restarts it)", cid)
                ray.kill(actor, no_restart=False)
                self.suspects.add(self.actors.index(actor))
            except RayActorError:  # the actor died: restarted, it re-reads every client anyway
                self.suspects.add(self.actors.index(actor))

    def _await_restarts(self) -> None:
        """Before dispatching, wait (bounded by the round timeout) for crashed actors to restart."""
        deadline = time.monotonic() + self.cfg.ray.round_timeout_s
        for idx in sorted(self.suspects):
            while time.monotonic() < deadline:
                try:
                    ray.get(
                        self.actors[idx].stats.remote(), timeout=max(deadline - time.monotonic(), 1)
                    )
                    break
                except ActorDiedError:
                    log.error("client actor %d is dead (max_restarts exhausted)", idx)
                    break
                except (RayActorError, GetTimeoutError):
                    time.sleep(0.5)
        self.suspects.clear()

    def _fail(self, step: int, cid: int, what: str, why: str) -> None:
        self.suspects.add(self.actors.index(self.owner[cid]))
        log.warning("round %d client %d %s failed: %s", step, cid, what, why)
        self.failures.append({"round": step, "client": cid, "call": what, "error": why})
        self.progress["failed"] += 1

    def fit(self, step, client_ids, global_state, stage, task=None) -> Iterator[FitResult]:
        self._await_restarts()
        ref = ray.put(to_wire(global_state))
        tref = ray.put(task)  # the round's keys travel once, not once per client
        pending = {self.owner[c].fit.remote(c, step, ref, stage, tref): c for c in client_ids}
        for result in self._gather(pending, step, "fit"):
            if result.global_state is not None:
                result = dataclasses.replace(result, global_state=from_wire(result.global_state))
            yield result

    def advertise(self, step, client_ids, attempt) -> Iterator[tuple[int, bytes]]:
        self._await_restarts()
        pending = {self.owner[c].advertise.remote(c, step, attempt): c for c in client_ids}
        yield from self._gather(pending, step, "advertise")

    def seal(self, client_ids, task) -> Iterator[tuple[int, np.ndarray]]:
        self._await_restarts()
        tref = ray.put(task)
        pending = {self.owner[c].seal.remote(c, tref): c for c in client_ids}
        yield from self._gather(pending, task.step, "seal")

    def evaluate(
        self, step, client_ids, global_state, weighting, global_scores=None
    ) -> Iterator[tuple[int, ItemScores]]:
        self._await_restarts()
        ref = ray.put(to_wire(global_state))
        shared = ray.put(global_scores)
        pending = {
            self.owner[c].evaluate.remote(c, ref, step, weighting, shared): c for c in client_ids
        }
        yield from self._gather(pending, step, "evaluate")

    def calibrate(
        self, step, client_ids, global_state, stage
    ) -> Iterator[tuple[int, float | None]]:
        """A client whose call fails keeps the trust 0 its fit staged (served as FedIT)."""
        self._await_restarts()
        ref = ray.put(to_wire(global_state))
        pending = {self.owner[c].calibrate.remote(c, ref, step, stage): c for c in client_ids}
        yield from self._gather(pending, step, "calibrate")

    def evaluate_global(self, global_state) -> ItemScores:
        """On the first actor that answers: one that dies meanwhile hands the call to the next
        (the scores do not depend on which host computes them)."""
        self._await_restarts()
        ref = ray.put(to_wire(global_state))
        errors = []
        for idx in [*range(len(self.actors)), 0]:  # actor 0 again last: restarted by then
            try:
                return ray.get(
                    self.actors[idx].evaluate_global.remote(ref),
                    timeout=self.cfg.ray.round_timeout_s,
                )
            except (RayActorError, GetTimeoutError) as err:
                why = f"{type(err).__name__}: {str(err).splitlines()[0]}"
                log.warning("global-adapter evaluation failed on client actor %d: %s", idx, why)
                self.suspects.add(idx)
                errors.append(why)
        raise RuntimeError(f"global-adapter evaluation failed on every client actor: {errors}")

    def initial_global(self):
        return from_wire(ray.get(self.actors[0].initial_global.remote())).state()

    def stats(self) -> list[dict]:
        return ray.get([a.stats.remote() for a in self.actors])

    def round_stats(self) -> dict:
        out = {"failures": self.failures, "transfer_s": self.transfer_s}
        self.failures, self.transfer_s = [], 0.0
        return out

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
