"""Privacy over Ray: the Ray path equals the in-process one under secure aggregation + DP, only
masked uploads cross the object store to the driver, and an actor killed after its clients were
masked in makes the survivors mask again (the round completes with their exact sum)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import adapter_hashes, tiny_config

from feddpa.core import secagg
from feddpa.orchestrator.executor import InProcessExecutor
from feddpa.orchestrator.loop import train
from feddpa.orchestrator.ray_executor import RayExecutor

pytestmark = pytest.mark.ray

CLIP = 0.05
PRIVATE = {
    "federation": {"rounds": 2, "min_fit_clients": 2},
    "eval": {"every": 0},
    "privacy": {
        "dp": {"enabled": True, "noise_multiplier": 0.5, "clip": CLIP, "noise": "client"},
        "secure_aggregation": {"enabled": True},
    },
}


def records(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


class RecordingExecutor(RayExecutor):
    returned: list = []

    def fit(self, step, client_ids, global_state, stage, task=None):
        for result in super().fit(step, client_ids, global_state, stage, task):
            RecordingExecutor.returned.append(result)
            yield result


def test_ray_equals_in_process_and_the_driver_sees_masked_uploads_only(ray_local, tmp_path):
    cfg = tiny_config(**PRIVATE)
    train(cfg, tmp_path / "inproc", InProcessExecutor)
    RecordingExecutor.returned = []
    train(cfg, tmp_path / "ray", RecordingExecutor)
    assert adapter_hashes(tmp_path / "ray") == adapter_hashes(tmp_path / "inproc")
    privacy = [[r["privacy"] for r in records(tmp_path / run)] for run in ("inproc", "ray")]
    assert privacy[0] == privacy[1] and privacy[0][-1]["epsilon"] > 0
    returned = RecordingExecutor.returned
    assert len(returned) == 8
    for result in returned:
        assert result.global_state is None and result.sealed.dtype == np.uint64
        # a clipped update has norm ≤ C (plus noise of std z·C/√m per coordinate); a masked one
        # decodes to values spread over ±2^(63−24)
        decoded = secagg.decode(result.sealed, 24)[:-3]
        assert np.linalg.norm(decoded) > 1e6 * CLIP


class KillingExecutor(RayExecutor):
    """At round 1's first sealed upload, kills the actor that produced it: its other client's
    fit fails and its first client's held update is lost with the process."""

    killed: list = []

    def fit(self, step, client_ids, global_state, stage, task=None):
        for result in super().fit(step, client_ids, global_state, stage, task):
            if step == 1 and not KillingExecutor.killed:
                import ray

                victim = self.owner[result.client_id]
                KillingExecutor.killed.append(self.blocks[self.actors.index(victim)])
                ray.kill(victim, no_restart=False)
            yield result


def test_an_actor_lost_after_masking_makes_the_survivors_mask_again(ray_local, tmp_path):
    cfg = tiny_config(**PRIVATE)
    KillingExecutor.killed = []
    train(cfg, tmp_path / "run", KillingExecutor)
    last = records(tmp_path / "run")[-1]
    lost = set(KillingExecutor.killed[0])
    assert last["privacy"]["attempts"] == 2
    assert last["privacy"]["uploads"] == 4 - len(lost)
    assert not lost & {int(c) for c in last["losses"]}
