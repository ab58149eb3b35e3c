"""Seeded client sampling: the clients of round r depend only on (seed, r), so resuming and
re-running sample identically without any sampler state to save.

- fixed: ceil(fraction_fit · N) clients (at least min_fit_clients) drawn without replacement;
- poisson: each client independently with probability fraction_fit (the sampling DP-FedAvg's
  amplification by subsampling assumes; the round's size varies, and may be zero).
"""

from __future__ import annotations

import math
import random

from feddpa.core.algorithms import derive_seed
from feddpa.core.config import FederationConfig


def sample_clients(ids: list[int], cfg: FederationConfig, seed: int, round_idx: int) -> list[int]:
    rng = random.Random(derive_seed(seed, "sample", round_idx))
    if cfg.sampling == "poisson":
        return [cid for cid in sorted(ids) if rng.random() < cfg.fraction_fit]
    count = min(len(ids), max(cfg.min_fit_clients, math.ceil(cfg.fraction_fit * len(ids))))
    if count == len(ids):
        return sorted(ids)
    return sorted(rng.sample(sorted(ids), count))
