"""The Ray path against the in-process reference, and what crosses to the driver."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import adapter_hashes, tiny_config

from feddpa.core.storage import load_adapter
from feddpa.orchestrator.executor import InProcessExecutor
from feddpa.orchestrator.loop import train
from feddpa.orchestrator.ray_executor import RayExecutor

pytestmark = pytest.mark.ray


TRUST = {
    "data": {"validation_fraction": 0.25},
    "weighting": {"representation": "base", "trust": "validation"},
}


@pytest.mark.parametrize("sections", [{}, TRUST], ids=["default", "trust"])
def test_ray_equals_in_process(ray_local, tmp_path, sections):
    """Same seed and config: identical global and local adapters and banks, bit for bit (with
    trust: each client's trust, calibrated by its actor against the aggregated global, too).

    Exact equality holds because every client's randomness derives from (seed, round, client,
    phase), each process runs torch with one thread, and FedAvg sums in float64 so the arrival
    order of updates cannot change the float32 average."""
    cfg = tiny_config(**sections)
    train(cfg, tmp_path / "inproc", InProcessExecutor)
    train(cfg, tmp_path / "ray", RayExecutor)
    reference = adapter_hashes(tmp_path / "inproc")
    assert any(k.startswith("clients/") and "/local/" in k for k in reference)
    assert adapter_hashes(tmp_path / "ray") == reference
    logged = [
        [
            json.loads(x)["trust"]
            for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        ]
        for run in ("inproc", "ray")
    ]
    assert logged[0] == logged[1]
    assert bool(logged[0][-1]) == bool(sections)  # four clients calibrated in the last round


class RecordingExecutor(RayExecutor):
    """Keeps every object a client actor returns from `fit`."""

    returned: list = []

    def fit(self, step, client_ids, global_state, stage):
        for result in super().fit(step, client_ids, global_state, stage):
            RecordingExecutor.returned.append(result)
            yield result


def test_only_global_adapter_reaches_driver(ray_local, tmp_path):
    cfg = tiny_config(federation={"rounds": 2}, eval={"every": 0})
    train(cfg, tmp_path / "run", RecordingExecutor)
    latest = tmp_path / "run" / "checkpoints" / (tmp_path / "run/checkpoints/LATEST").read_text()
    locals_ = [load_adapter(d) for d in sorted(latest.glob("clients/*/local"))]
    assert len(locals_) == 4
    local_tensors = [t for state in locals_ for t in state.values() if t.abs().sum() > 0]
    returned = RecordingExecutor.returned
    assert len(returned) == 8  # 4 clients x 2 rounds
    for result in returned:
        assert set(vars(result)) == {
            "client_id",
            "num_examples",
            "global_state",
            "losses",
            "compute_s",
            "sealed",
            "nonfinite",
        }
        assert result.sealed is None  # no privacy configured: the adapter itself travels
        for tensor in result.global_state.state().values():  # FlatState off the wire
            assert not any(
                tensor.shape == t.shape and torch.equal(tensor, t) for t in local_tensors
            ), "a local-adapter tensor was returned to the driver"


class KillingExecutor(RayExecutor):
    """At round 0's first result, kills the actor that produced it (Ray restarts it). An actor runs
    its clients one after the other, so its next client's call has been pushed to it and is
    running or queued there: that call fails. (Killing another actor raced: it could finish all
    its clients first; killing before any result raced too: calls not yet pushed to an actor are
    sent to its restarted instance and succeed.)"""

    killed: list = []

    def fit(self, step, client_ids, global_state, stage):
        for result in super().fit(step, client_ids, global_state, stage):
            if step == 0 and not KillingExecutor.killed:
                victim = self.owner[result.client_id]
                KillingExecutor.killed.append(self.blocks[self.actors.index(victim)])
                ray_kill(victim)
            yield result


def ray_kill(actor):
    import ray

    ray.kill(actor, no_restart=False)


def test_killed_actor_clients_rejoin_from_committed_state(ray_local, tmp_path):
    cfg = tiny_config(federation={"rounds": 3, "min_fit_clients": 1}, eval={"every": 0})
    run = tmp_path / "run"
    train(cfg, run, KillingExecutor)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    victims = set(KillingExecutor.killed[0])
    failed0 = {f["client"] for f in records[0]["failures"]}
    assert failed0 and failed0 <= victims, records[0]["failures"]
    for later in records[1:]:  # the restarted actor's clients take part again and succeed
        assert not later["failures"]
        assert victims <= {int(c) for c in later["losses"]}
    latest = run / "checkpoints" / (run / "checkpoints/LATEST").read_text()
    assert len(list(latest.glob("clients/*/local/adapter_model.safetensors"))) == 4
