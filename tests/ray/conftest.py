"""A local Ray instance on 127.0.0.1 shared by the Ray tests, and small run configs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ray = pytest.importorskip("ray")

from feddpa.core.config import ExperimentConfig, build_config  # noqa: E402

TASKS = ["routing_acme", "routing_globex", "sentiment_movies", "animal_class"]


@pytest.fixture(scope="session")
def ray_local():
    from feddpa.orchestrator.driver import init_ray

    init_ray("local", num_cpus=2)
    yield ray
    ray.shutdown()


def tiny_config(**sections) -> ExperimentConfig:
    """4 clients x 16 items, 2 rounds, one thread per process (bit-equal across processes)."""
    base = {
        "seed": 3,
        "method": "feddpa_t",
        "model": {"max_length": 32, "threads": 1},
        "data": {"tasks": TASKS, "train_per_task": 16, "test_per_task": 4},
        "federation": {"rounds": 2},
        "train": {"batch_size": 8, "micro_batch_size": 8, "lr": 1e-3},
        "eval": {"batch_size": 32, "every": 1},
        "ray": {"num_actors": 2, "cpus_per_actor": 0.5, "round_timeout_s": 300},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return build_config(base)


def adapter_hashes(run_dir: Path) -> dict[str, str]:
    """sha256 of every adapter/bank tensor file in the latest committed round."""
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "LATEST").read_text().strip()
    return {
        str(p.relative_to(latest)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(latest.rglob("*.safetensors"))
    }
