"""Seeded client sampling: the clients of round r depend only on (seed, r), so resuming and
re-running sample identically without any sampler state to save."""

from __future__ import annotations

import math
import random

from feddpa.core.algorithms import derive_seed
from feddpa.core.config import FederationConfig


def sample_clients(ids: list[int], cfg: FederationConfig, seed: int, round_idx: int) -> list[int]:
    count = min(len(ids), max(cfg.min_fit_clients, math.ceil(cfg.fraction_fit * len(ids))))
    if count == len(ids):
        return sorted(ids)
    rng = random.Random(derive_seed(seed, "sample", round_idx))
    return sorted(rng.sample(sorted(ids), count))
