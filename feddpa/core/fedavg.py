"""FedAvg (McMahan et al. 2017; FedDPA arXiv 2403.19211, Eq. 3) as a running weighted sum.

    θ_global = Σ_m n_m θ_m / Σ_m n_m

Updates are folded in one at a time, so memory is one sum buffer whatever the number of clients.
The sum is kept in float64, which makes the result independent of arrival order up to float32
rounding of the final average (the Ray driver folds updates in completion order).
"""

from __future__ import annotations

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
        if weight <= 0:
            raise ValueError(f"FedAvg weight must be positive, got {weight}")
        if self._sum and state.keys() != self._sum.keys():
            missing = sorted(set(self._sum) ^ set(state))[:3]
            raise ValueError(f"update does not match earlier updates' tensors (e.g. {missing})")
        for key, value in state.items():
            term = value.detach().to(torch.float64) * weight
            if key in self._sum:
                self._sum[key] += term
            else:
                self._sum[key] = term.clone()
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
