"""From a data config to per-client Parquet shards: load → filter → partition → (cap) → (hold out)
→ write.

`data.max_train_per_client` keeps a seeded random subset of each client's training items (in their
order), for budgets smaller than the source.

With `data.holdout_fraction > 0` each client keeps that share of its training data aside and the
run evaluates on those held-out items instead of the test split — the mode for choosing
hyper-parameters without ever looking at test data.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from feddpa.core.config import DataConfig
from feddpa.core.records import Example
from feddpa.datasets.errors import DataError
from feddpa.datasets.loaders import FederatedData, load_feddpa_release, load_files
from feddpa.datasets.partition import (
    partition_by_task,
    partition_dirichlet,
    partition_iid,
    split_holdout,
    subsample,
)
from feddpa.datasets.shards import Manifest, write_shards
from feddpa.datasets.shared_input import SHARED_INPUT_TASKS, generate_shared_input
from feddpa.datasets.synthetic import SYNTHETIC_TASKS, generate_synthetic

_BUILT_IN = {  # data.source -> (generator, its tasks in client order)
    "synthetic": (generate_synthetic, SYNTHETIC_TASKS),
    "shared_input": (generate_shared_input, SHARED_INPUT_TASKS),
}


def load_source(cfg: DataConfig) -> FederatedData:
    if cfg.source in _BUILT_IN:
        generate, tasks = _BUILT_IN[cfg.source]
        train, test = generate(cfg.seed, cfg.train_per_task, cfg.test_per_task)
        clients = tuple(tuple(train[t]) for t in tasks)
        return FederatedData(clients, tuple(test), f"{cfg.source}(seed={cfg.seed})")
    if cfg.source == "feddpa":
        return load_feddpa_release(str(cfg.path))
    return load_files(list(cfg.train_files), str(cfg.test_file))


def keep_tasks(data: FederatedData, tasks: tuple[str, ...] | None) -> FederatedData:
    if tasks is None:
        return data
    unknown = sorted(set(tasks) - set(data.tasks))
    if unknown:
        raise DataError(
            f"data.tasks names {unknown}, not in {data.source}; known: {list(data.tasks)}"
        )
    clients = tuple(kept for c in data.clients if (kept := tuple(e for e in c if e.task in tasks)))
    return FederatedData(clients, tuple(e for e in data.test if e.task in tasks), data.source)


def require_options(data: FederatedData) -> None:
    """A multiple-choice model needs an OPTIONS block on every item."""
    for ex in [*data.pooled_train(), *data.test]:
        if not ex.options:
            raise DataError(
                f"{data.source}: task {ex.task!r} has items without an OPTIONS block, which the "
                f"multiple_choice model cannot score; list the multiple-choice tasks in data.tasks "
                f"or use model.kind causal_lm"
            )


def partition(data: FederatedData, cfg: DataConfig) -> list[list[Example]]:
    if cfg.partition == "task":
        if all(len({e.task for e in c}) == 1 for c in data.clients) and data.num_clients > 1:
            return [list(c) for c in data.clients]  # the source's own one-task clients, in order
        return partition_by_task(data.pooled_train())
    assert cfg.num_clients is not None  # checked by DataConfig
    if cfg.partition == "dirichlet":
        return partition_dirichlet(data.pooled_train(), cfg.num_clients, cfg.alpha, cfg.seed)
    return partition_iid(data.pooled_train(), cfg.num_clients, cfg.seed)


def cap_per_task(items: list[Example], limit: int | None) -> list[Example]:
    if limit is None:
        return items
    counts: dict[str, int] = defaultdict(int)
    kept = []
    for ex in items:
        if counts[ex.task] < limit:
            counts[ex.task] += 1
            kept.append(ex)
    return kept


def prepare_shards(
    cfg: DataConfig, out_dir: Path, *, model_kind: str, max_test_per_task: int | None = None
) -> Manifest:
    """Write the run's client shards and evaluation set into `out_dir` (idempotent)."""
    data = keep_tasks(load_source(cfg), cfg.tasks)
    if model_kind == "multiple_choice":
        require_options(data)
    clients = [
        subsample(c, cfg.max_train_per_client, cfg.seed + i)
        for i, c in enumerate(partition(data, cfg))
    ]
    test = list(data.test)
    if cfg.holdout_fraction > 0:
        splits = [
            split_holdout(c, cfg.holdout_fraction, cfg.seed + i) for i, c in enumerate(clients)
        ]
        clients = [train for train, _ in splits]
        test = [ex for _, held in splits for ex in held]
    return write_shards(clients, cap_per_task(test, max_test_per_task), out_dir)
