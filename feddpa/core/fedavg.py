"""FedAvg (McMahan et al. 2017; FedDPA arXiv 2403.19211, Eq. 3) as a running weighted sum.

    θ_global = Σ_m n_m θ_m / Σ_m n_m

Updates are folded in one at a time, so memory is one sum buffer whatever the number of clients.
The sum is kept in float64, which makes the result independent of arrival order up to float32
rounding of the final average (the Ray driver folds updates in completion order).
"""

from __future__ import annotations

import math

import torch

State = dict[str, torch.Tensor]


class RunningAverage:
    """Fold (state, weight) pairs; `result()` is the weighted mean in the states' dtype."""

    def __init__(self) -> None:
        self._sum: State = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, state: State, weight: float) -> None:
        if not (weight > 0 and math.isfinite(weight)):  # also rejects NaN
            raise ValueError(f"FedAvg weight must be positive and finite, got {weight}")
        if self._sum and state.keys() != self._sum.keys():
            missing = sorted(set(self._sum) ^ set(state))[:3]
            raise ValueError(f"update does not match earlier updates' tensors (e.g. {missing})")
        # checked before folding: `+=` would silently broadcast e.g. an r=1 tensor into r=8
        reshaped = [k for k, v in state.items() if k in self._sum and v.shape != self._sum[k].shape]
        if reshaped:
            raise ValueError(
                f"update tensor {reshaped[0]!r} has a different shape than earlier updates"
            )
        for key, value in state.items():
            if key in self._sum:  # in place, no temporaries: sum += weight * value (in float64)
                self._sum[key].add_(value.detach(), alpha=weight)
            else:
                self._sum[key] = value.detach().to(torch.float64) * weight
                self._dtypes[key] = value.dtype
        self.total_weight += weight
        self.count += 1

    def result(self) -> State:
        if not self.count:
            raise ValueError("FedAvg over zero updates")
        return {k: (v / self.total_weight).to(self._dtypes[k]) for k, v in self._sum.items()}


def fedavg(updates: list[tuple[State, float]]) -> State:
    """Weighted mean of (state, num_examples) pairs."""
    avg = RunningAverage()
    for state, weight in updates:
        avg.add(state, weight)
    return avg.result()
