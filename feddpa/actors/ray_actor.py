"""The Ray client actor: a `ClientHost` (base model loaded once, its clients' shards, local adapters
and banks) behind a Ray handle. Crashed actors are restarted by Ray (`max_restarts`) and restore
their clients from the latest committed round at their first call."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import psutil
import ray
import torch

from feddpa.actors.host import ClientHost, FitResult
from feddpa.core.adapters import AdapterState
from feddpa.core.config import ExperimentConfig, WeightingConfig
from feddpa.core.evaluation import ItemScores
from feddpa.core.fedavg import FlatState, Layout
from feddpa.core.privacy import ClientTask
from feddpa.core.storage import RunDir, Stage


@dataclass(frozen=True)
class Wire:
    """An adapter crossing the actor boundary: one flat numpy buffer (zero-copy through the object
    store, ~6x cheaper to serialize than torch tensors) and its layout. bfloat16 has no numpy
    dtype, so it travels as its int16 bit pattern (exact)."""

    layout: Layout
    dtype: str
    data: np.ndarray


def to_wire(state: AdapterState | FlatState) -> Wire:
    flat = FlatState.of(state)
    data = flat.data.view(torch.int16) if flat.data.dtype == torch.bfloat16 else flat.data
    return Wire(flat.layout, str(flat.data.dtype).removeprefix("torch."), data.numpy())


def from_wire(wire: Wire) -> FlatState:
    data = torch.from_numpy(np.array(wire.data))  # a writable copy of the object-store buffer
    if wire.dtype == "bfloat16":
        data = data.view(torch.bfloat16)
    return FlatState(wire.layout, data)


class ClientActor:
    def __init__(
        self, cfg: ExperimentConfig, data_dir: str, client_ids: list[int], run: RunDir
    ) -> None:
        self.host = ClientHost(cfg, data_dir, client_ids, run)

    def discard(self, cid: int) -> None:
        self.host.discard(cid)

    def fit(
        self, cid: int, step: int, global_state: Wire, stage: Stage, task: ClientTask | None = None
    ) -> FitResult:
        """Under privacy the result carries only the sealed upload (a numpy uint64 vector)."""
        result = self.host.fit(cid, step, from_wire(global_state).state(), stage, task)
        if result.global_state is None:
            return result
        return dataclasses.replace(result, global_state=to_wire(result.global_state))  # type: ignore[arg-type]

    def advertise(self, cid: int, step: int, attempt: int) -> tuple[int, bytes]:
        return cid, self.host.advertise(cid, step, attempt)

    def seal(self, cid: int, task: ClientTask) -> tuple[int, np.ndarray]:
        return cid, self.host.seal(cid, task)

    def evaluate(
        self,
        cid: int,
        global_state: Wire,
        step: int,
        weighting: WeightingConfig,
        global_scores: ItemScores | None = None,
    ) -> tuple[int, ItemScores]:
        state = from_wire(global_state).state()
        return cid, self.host.evaluate(cid, state, step, weighting, global_scores)

    def calibrate(
        self, cid: int, global_state: Wire, step: int, stage: Stage
    ) -> tuple[int, float | None]:
        state = from_wire(global_state).state()
        return cid, self.host.calibrate(cid, state, step, stage)

    def evaluate_global(self, global_state: Wire) -> ItemScores:
        return self.host.evaluate_global(from_wire(global_state).state())

    def initial_global(self) -> Wire:
        return to_wire(self.host.initial_global())

    def stats(self) -> dict:
        """Process memory and identity, for benchmarks and placement checks."""
        ctx = ray.get_runtime_context()
        return {
            "pid": os.getpid(),
            "rss_bytes": psutil.Process().memory_info().rss,
            "node_id": ctx.get_node_id(),
            "clients": sorted(self.host.clients),
        }


def client_actor_class(cfg: ExperimentConfig):
    """The remote class with the run's resources and restart policy."""
    return ray.remote(
        num_cpus=cfg.ray.cpus_per_actor,
        num_gpus=cfg.ray.gpus_per_actor,
        max_restarts=cfg.ray.max_restarts,
        max_task_retries=0,
    )(ClientActor)
