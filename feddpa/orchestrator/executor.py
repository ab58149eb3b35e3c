"""Executors run client work for the round loop. `InProcessExecutor` hosts every client in this
process — the reference path; the Ray executor (feddpa.orchestrator.ray_executor) spreads the same
`ClientHost` calls over actors. Both yield results as they complete."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from feddpa.actors.host import ClientHost, FitResult
from feddpa.core.adapters import AdapterState
from feddpa.core.algorithms import method_of
from feddpa.core.config import ExperimentConfig, WeightingConfig
from feddpa.core.evaluation import ItemScores
from feddpa.core.privacy import ClientTask
from feddpa.core.storage import RunDir, Stage


class Executor(Protocol):
    def fit(
        self,
        step: int,
        client_ids: list[int],
        global_state: AdapterState,
        stage: Stage,
        task: ClientTask | None = None,
    ) -> Iterator[FitResult]:
        """Each client's result; with a privacy `task`, its sealed upload instead of its adapter."""
        ...

    def advertise(
        self, step: int, client_ids: list[int], attempt: int
    ) -> Iterator[tuple[int, bytes]]:
        """Each client's public key of masking attempt `attempt` (secure aggregation)."""
        ...

    def seal(self, client_ids: list[int], task: ClientTask) -> Iterator[tuple[int, np.ndarray]]:
        """Each client's held update sealed again for a new masking attempt (`ClientHost.seal`)."""
        ...

    def evaluate(
        self,
        step: int,
        client_ids: list[int],
        global_state: AdapterState,
        weighting: WeightingConfig,
        global_scores: ItemScores | None = None,
    ) -> Iterator[tuple[int, ItemScores]]:
        """Each client's item scores; `global_scores` (the global adapter's own) supply the items
        whose mix is the global adapter alone."""
        ...

    def evaluate_global(self, global_state: AdapterState) -> ItemScores: ...

    def calibrate(
        self, step: int, client_ids: list[int], global_state: AdapterState, stage: Stage
    ) -> Iterator[tuple[int, float | None]]:
        """Each client's trust in its local adapter against the aggregated `global_state`, its
        bank restaged with it (`ClientHost.calibrate`)."""
        ...

    def initial_global(self) -> AdapterState: ...

    def round_stats(self) -> dict:
        """{'failures': [...], 'transfer_s': float} since the last call."""
        ...

    def discard(self, client_ids: list[int]) -> None:
        """These clients' rounds failed: their hosts re-read them from the run directory."""
        ...

    def close(self) -> None: ...


class InProcessExecutor:
    def __init__(
        self, cfg: ExperimentConfig, data_dir: str, client_ids: list[int], run: RunDir
    ) -> None:
        self.host = ClientHost(cfg, data_dir, method_of(cfg).hosted_clients(client_ids), run)

    def fit(self, step, client_ids, global_state, stage, task=None):
        for cid in tqdm(client_ids, desc=f"round {step} clients", leave=False, unit="client"):
            yield self.host.fit(cid, step, global_state, stage, task)

    def advertise(self, step, client_ids, attempt):
        for cid in client_ids:
            yield cid, self.host.advertise(cid, step, attempt)

    def seal(self, client_ids, task):
        for cid in client_ids:
            yield cid, self.host.seal(cid, task)

    def evaluate(self, step, client_ids, global_state, weighting, global_scores=None):
        for cid in tqdm(client_ids, desc=f"round {step} eval", leave=False, unit="client"):
            yield cid, self.host.evaluate(cid, global_state, step, weighting, global_scores)

    def evaluate_global(self, global_state):
        return self.host.evaluate_global(global_state)

    def calibrate(self, step, client_ids, global_state, stage):
        for cid in client_ids:
            yield cid, self.host.calibrate(cid, global_state, step, stage)

    def initial_global(self):
        return self.host.initial_global()

    def round_stats(self) -> dict:
        return {"failures": [], "transfer_s": 0.0}  # in process, a failing client raises

    def discard(self, client_ids: list[int]) -> None:
        for cid in client_ids:
            self.host.discard(cid)

    def close(self) -> None:
        return None
