"""Split a pool of examples across clients: by task, task-Dirichlet, IID; and a stratified holdout.

Every function takes an explicit seed and draws from its own `numpy.random.Generator`, never the
global RNG, so the same inputs give the same split on every machine. Within a client, examples keep
their input order.

`partition_dirichlet` is the label-Dirichlet split of Hsu et al. 2019 ("Measuring the effects of
non-identical data distribution", arXiv 1909.06335) with the task as the label, in the form used by
FedML/FedMA (Wang et al. 2020, arXiv 2002.06440): for task t, proportions q_t ~ Dir(alpha · 1_C),
with clients already holding >= N / C examples masked out, and the task's shuffled examples are cut
at the cumulative proportions. Small alpha gives each client few tasks; large alpha near-IID.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from feddpa.core.records import Example
from feddpa.datasets.errors import DataError


def partition_by_task(examples: Sequence[Example]) -> list[list[Example]]:
    """One client per task, tasks in sorted order (the FedDPA paper's setting)."""
    _require_examples(examples)
    return [[examples[i] for i in indices] for indices in _indices_by_task(examples).values()]


def partition_dirichlet(
    examples: Sequence[Example],
    num_clients: int,
    alpha: float,
    seed: int,
    min_examples: int = 1,
    *,
    max_tries: int = 100,
) -> list[list[Example]]:
    """Task-Dirichlet split; redraw (at most `max_tries` times) until each client has enough.

    Raises `DataError` when no draw gives every client `min_examples`: then lower `num_clients`
    or `min_examples`, or raise `alpha`.
    """
    _require_examples(examples)
    _require_positive("num_clients", num_clients)
    _require_positive("max_tries", max_tries)
    if not alpha > 0:
        raise DataError(f"partition_dirichlet: alpha is {alpha}; it must be > 0 (try 0.5 or 1.0)")
    if min_examples < 0 or num_clients * min_examples > len(examples):
        raise DataError(
            f"partition_dirichlet: {num_clients} clients x min_examples {min_examples} needs "
            f"{num_clients * min_examples} examples but there are {len(examples)}; "
            "lower num_clients or min_examples"
        )
    rng = np.random.default_rng(seed)
    by_task = list(_indices_by_task(examples).values())
    for _ in range(max_tries):
        assignment = _dirichlet_draw(rng, by_task, num_clients, alpha)
        if min(len(indices) for indices in assignment) >= min_examples:
            return [[examples[i] for i in indices] for indices in assignment]
    raise DataError(
        f"partition_dirichlet: no draw in {max_tries} gave every one of {num_clients} clients at "
        f"least {min_examples} of the {len(examples)} examples at alpha {alpha}; lower "
        "num_clients or min_examples, or raise alpha"
    )


def partition_iid(examples: Sequence[Example], num_clients: int, seed: int) -> list[list[Example]]:
    """Shuffle, then cut into `num_clients` parts whose sizes differ by at most one."""
    _require_examples(examples)
    _require_positive("num_clients", num_clients)
    if num_clients > len(examples):
        raise DataError(
            f"partition_iid: {num_clients} clients but only {len(examples)} examples, so some "
            "clients would get none; lower num_clients"
        )
    order = np.random.default_rng(seed).permutation(len(examples))
    return [[examples[i] for i in np.sort(part)] for part in np.array_split(order, num_clients)]


def split_holdout(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, holdout), holding out round(fraction · n_t) of each task's n_t examples.

    At least one example of every task stays in train. Both parts keep the input order.
    Fraction 0 returns (all examples, []).
    """
    if not 0 <= fraction < 1:
        raise DataError(f"split_holdout: fraction is {fraction}; it must be in [0, 1)")
    if fraction == 0:
        return list(examples), []
    rng = np.random.default_rng(seed)
    held = np.zeros(len(examples), dtype=bool)
    for indices in _indices_by_task(examples).values():
        count = min(round(fraction * len(indices)), len(indices) - 1)
        held[rng.permutation(indices)[:count]] = True
    train = [ex for ex, h in zip(examples, held, strict=True) if not h]
    holdout = [ex for ex, h in zip(examples, held, strict=True) if h]
    return train, holdout


def subsample(examples: Sequence[Example], limit: int | None, seed: int) -> list[Example]:
    """`limit` examples drawn without replacement (seeded), in their input order; all if fewer."""
    if limit is None or len(examples) <= limit:
        return list(examples)
    _require_positive("limit", limit)
    keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:limit])
    return [examples[i] for i in keep]


def _dirichlet_draw(
    rng: np.random.Generator, by_task: list[np.ndarray], num_clients: int, alpha: float
) -> list[np.ndarray]:
    """One draw: a sorted index array per client."""
    total = sum(len(indices) for indices in by_task)
    counts = np.zeros(num_clients, dtype=np.int64)
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for indices in by_task:
        shares = rng.dirichlet(np.full(num_clients, alpha))
        # Mask clients already at the mean size so later tasks fill the small ones (unless the
        # draw put all its mass on masked clients: then keep it as drawn).
        masked = shares * (counts < total / num_clients)
        shares = masked / masked.sum() if masked.sum() > 0 else shares
        # A fresh client order per task, so rounding in the cuts favours no client across tasks.
        order = rng.permutation(num_clients)
        cuts = (np.cumsum(shares[order]) * len(indices)).astype(np.int64)[:-1]
        for client, part in zip(order, np.split(rng.permutation(indices), cuts), strict=True):
            pieces[client].append(part)
            counts[client] += len(part)
    return [np.sort(np.concatenate(parts)) for parts in pieces]


def _indices_by_task(examples: Sequence[Example]) -> dict[str, np.ndarray]:
    """Task name -> indices of its examples (ascending), tasks in sorted order."""
    grouped: dict[str, list[int]] = {}
    for index, ex in enumerate(examples):
        grouped.setdefault(ex.task, []).append(index)
    return {task: np.asarray(grouped[task], dtype=np.int64) for task in sorted(grouped)}


def _require_examples(examples: Sequence[Example]) -> None:
    if not examples:
        raise DataError("partition: there are no examples to split; load some data first")


def _require_positive(name: str, value: int) -> None:
    if value < 1:
        raise DataError(f"partition: {name} is {value}; it must be at least 1")
