"""P and TTP (FedDPA, arXiv 2403.19211, Sec. 5.1).

P   = a client's score on the test items of its own task(s);
TTP = its score on all test items of all tasks (own included).
Scores are accuracy for multiple-choice items and ROUGE-1 F for free text, per item; a task's score
is the mean over its items, P and TTP are means over items.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from feddpa.core.config import WeightingConfig
from feddpa.core.models import TaskModel
from feddpa.core.records import Example
from feddpa.core.weighting import instance_mix, needs_bank


@dataclass(frozen=True)
class ItemScores:
    scores: tuple[float, ...]
    global_weights: tuple[float, ...]  # weight each item gave the global adapter


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def representation_bank(model: TaskModel, data: list[Example], batch_size: int) -> torch.Tensor:
    """(N, H) local-only representations of the client's training prompts."""
    reps = [model.represent([model.query_text(e) for e in b]) for b in chunks(data, batch_size)]
    return torch.cat(reps).float()


@torch.no_grad()
def score_items(
    model: TaskModel,
    test: list[Example],
    weighting: WeightingConfig,
    bank: torch.Tensor | None,
    seed: int,
    batch_size: int,
) -> ItemScores:
    """Per-item scores of `test` under the client's instance-wise weighting."""
    gen = torch.Generator().manual_seed(seed)
    scores: list[float] = []
    weights: list[float] = []
    for batch in chunks(test, batch_size):
        queries = None
        if needs_bank(weighting):
            queries = model.represent([model.query_text(e) for e in batch])
        mix = instance_mix(queries, bank, weighting, gen)
        batch_scores, _ = model.score(batch, mix)
        scores.extend(batch_scores)
        weights.extend(mix.as_rows(len(batch))[0].tolist())
    return ItemScores(tuple(scores), tuple(weights))


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(test: list[Example], items: ItemScores, own_tasks: set[str]) -> dict:
    """{'P', 'TTP', 'per_task': {task: score}, 'mean_global_weight'} for one client."""
    by_task: dict[str, list[float]] = defaultdict(list)
    for ex, s in zip(test, items.scores, strict=True):
        by_task[ex.task].append(s)
    own = [s for ex, s in zip(test, items.scores, strict=True) if ex.task in own_tasks]
    return {
        "P": mean(own),
        "TTP": mean(list(items.scores)),
        "per_task": {t: mean(v) for t, v in sorted(by_task.items())},
        "mean_global_weight": mean(list(items.global_weights)),
    }
