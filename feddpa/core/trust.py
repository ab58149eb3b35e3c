"""How far a client trusts its local adapter on its own inputs: chosen on its own validation slice.

FedDPA (arXiv 2403.19211) mixes a global and a local adapter; a local adapter trained on a few
items (or under the training mix a = 0.5, as FedDPA-T's is) can be worse on the client's own task
than the global adapter it is mixed with. Each client therefore keeps a validation slice of its
training data (never trained on) and picks, from `weighting.trust_grid`, the local weight t whose
mix Mix(1 − t, t) has the lowest loss there — the training objective on unseen own-task items:

    t* = argmin_t  L_val(Mix(1 − t, t)),   ties to the smaller t (the global adapter).

The gate scales its local weights by t* (feddpa.core.weighting): t* = 0 serves the client by the
global adapter alone, i.e. exactly FedIT, so personalization can only cost what the validation
slice fails to predict. Only the client's own data is read.
"""

from __future__ import annotations

import random

import torch

from feddpa.core.adapters import Mix
from feddpa.core.models import TaskModel
from feddpa.core.records import Example


def split_validation(
    items: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded round(fraction · n) of the items, at least one when the
    fraction is > 0 and at least two items remain for training; order kept in both parts."""
    if fraction <= 0 or len(items) < 3:
        return list(items), []
    n_val = min(max(1, round(fraction * len(items))), len(items) - 2)
    chosen = set(random.Random(seed).sample(range(len(items)), n_val))
    train = [ex for i, ex in enumerate(items) if i not in chosen]
    return train, [ex for i, ex in enumerate(items) if i in chosen]


@torch.no_grad()
def validation_losses(
    model: TaskModel, items: list[Example], grid: tuple[float, ...], batch_size: int
) -> dict[float, float]:
    """{t: mean loss of the items under Mix(1 − t, t)} (batches weighted by their size)."""
    out = {}
    for t in grid:
        total = 0.0
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            total += float(model.loss(batch, Mix(1.0 - t, t))) * len(batch)
        out[t] = total / len(items)
    return out


def choose_trust(losses: dict[float, float]) -> float:
    """The weight with the lowest loss; among equal losses the smallest (nearest the global)."""
    if not losses:
        raise ValueError("choose_trust: no validation losses (empty trust_grid)")
    return min(losses, key=lambda t: (losses[t], t))
