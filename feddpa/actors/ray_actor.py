"""The Ray client actor: a `ClientHost` (base model loaded once, its clients' shards, local adapters
and banks) behind a Ray handle. Crashed actors are restarted by Ray (`max_restarts`) and restore
their clients from the latest committed round at their first call."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import ray

from feddpa.actors.host import ClientHost, FitResult
from feddpa.core.adapters import AdapterState
from feddpa.core.config import ExperimentConfig, WeightingConfig
from feddpa.core.evaluation import ItemScores


class ClientActor:
    def __init__(
        self, cfg: ExperimentConfig, data_dir: str, client_ids: list[int], checkpoints: str
    ) -> None:
        self.host = ClientHost(cfg, data_dir, client_ids, Path(checkpoints))

    def fit(self, cid: int, step: int, global_state: AdapterState, stage: str) -> FitResult:
        return self.host.fit(cid, step, global_state, Path(stage))

    def evaluate(
        self, cid: int, global_state: AdapterState, step: int, weighting: WeightingConfig
    ) -> tuple[int, ItemScores]:
        return cid, self.host.evaluate(cid, global_state, step, weighting)

    def evaluate_global(self, global_state: AdapterState) -> ItemScores:
        return self.host.evaluate_global(global_state)

    def initial_global(self) -> AdapterState:
        return self.host.initial_global()

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
